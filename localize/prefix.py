"""Computing once what the samples of a pass share: each block of the UNet once per distinct
state its samples need there.

Why: a pass holds several candidate neuron sets for the same few (seed, prompt) rows, and the
candidates differ only from some layer on (refinement walks one layer at a time, the initial
selection's steps differ everywhere). `PrefixUNet` is the UNet written out block by block with a
row gather before each down/mid transformer block and before the up path: the caller feeds one
row per distinct (seed, prompt), and each gather takes the rows out to one per distinct (row,
masks of the layers up to that block) (`PrefixLayout.tree`). A pass whose candidates part at
different layers (a refinement pass spans layers; a candidate's later seeds run beside the next
candidates' first) thus computes each block no more often than its samples differ there.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..model import Model
from .masks import NeuronSet, ValueMasks


_GATHER = ("gather",)
# Head states kept between passes (`HeadStates`): a few per seed are what refinement reuses; at
# SD 1.x's 64 px latents a state is about 22 MB in fp32.
CACHE_BYTES = 512 << 20


def _steps(u: nn.Module) -> list[tuple]:
    """The UNet's forward (SD 1.x/2.x layout, after conv_in) as a flat list of steps, with a
    gather marker before each down/mid transformer block and before the up path."""
    steps: list[tuple] = []
    for block in u.down_blocks:
        cross = getattr(block, "has_cross_attention", False)
        for i, resnet in enumerate(block.resnets):
            steps.append(("resnet", resnet))
            if cross:
                steps += [_GATHER, ("attn", block.attentions[i])]
            steps.append(("push",))
        for down in block.downsamplers or ():
            steps.append(("plain", down))
        if block.downsamplers:
            steps.append(("push",))
    mid = u.mid_block
    steps.append(("resnet", mid.resnets[0]))
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        steps += [_GATHER, ("attn", attn), ("resnet", resnet)]
    steps.append(_GATHER)
    steps += [("up", block) for block in u.up_blocks]
    steps.append(("out",))
    return steps


class PrefixUNet(nn.Module):
    """UNet(sample, timestep, text, mask_0..mask_{L-1}, gather_0..gather_G) -> noise prediction.
    `mask_i` holds layer i's masks for the states its block computes; `gather_g` the state each
    state after gather point g continues (`Tree`). Run eagerly, a gather may be None: the identity,
    without copying. `head`/`tail` run the same forward in two parts, cut at a gather point."""

    def __init__(self, model: Model, points: list[str]):
        super().__init__()
        self.unet = model.unet
        self.masks = ValueMasks(model)
        self.paths = [v.path for v in model.value_layers]
        self.points = points  # `gather_points(model)`: the forward gathers before each, then before the up path
        self.steps = _steps(model.unet)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor | None) -> torch.Tensor:
        masks, gathers = rest[:len(self.paths)], list(rest[len(self.paths):])
        return self._run(self._start(sample, timestep, encoder_hidden_states), self.steps, masks, gathers)[0]

    def cut(self, split: int) -> int:
        """Where the steps part at gather point `split`: the index of its marker."""
        return [i for i, st in enumerate(self.steps) if st is _GATHER][split]

    def head(self, split: int, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
             masks: tuple, gathers: list) -> tuple:
        """The forward up to gather point `split` (masks of the layers before it, gathers
        0..split-1): its state (h, time embedding, text, skip tensors)."""
        state = self._start(sample, timestep, encoder_hidden_states)
        return self._run(state, self.steps[:self.cut(split)], masks, gathers)

    def tail(self, split: int, state: tuple, masks: tuple, gathers: list) -> torch.Tensor:
        """The rest of the forward from a `head` state: masks of the layers from gather point
        `split` on (earlier ones are left as None), gathers split..G."""
        masks = (None,) * (len(self.paths) - len(masks)) + tuple(masks)
        return self._run(state, self.steps[self.cut(split):], masks, gathers)[0]

    def _start(self, sample, timestep, ehs) -> tuple:
        u = self.unet
        emb = u.time_embedding(u.time_proj(timestep).to(sample.dtype))
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        h = u.conv_in(sample)
        return h, emb, ehs, [h]

    def _run(self, state: tuple, steps: list[tuple], masks: tuple, gathers: list) -> tuple:
        u = self.unet
        h, emb, ehs, res = state[0], state[1], state[2], list(state[3])
        self.masks._masks = {p: m for p, m in zip(self.paths, masks) if m is not None}
        gathers = list(gathers)
        try:
            for step in steps:
                kind = step[0]
                if kind == "gather":
                    idx = gathers.pop(0)
                    if idx is not None:
                        h, emb, ehs, res = h[idx], emb[idx], ehs[idx], [r[idx] for r in res]
                elif kind == "resnet":
                    h = step[1](h, emb)
                elif kind == "attn":
                    h = step[1](h, encoder_hidden_states=ehs, return_dict=False)[0]
                elif kind == "push":
                    res.append(h)
                elif kind == "plain":
                    h = step[1](h)
                elif kind == "up":
                    block = step[1]
                    n = len(block.resnets)
                    skip, res = tuple(res[-n:]), res[:-n]
                    if getattr(block, "has_cross_attention", False):
                        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skip, encoder_hidden_states=ehs)
                    else:
                        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skip)
                else:  # "out"
                    if u.conv_norm_out is not None:
                        h = u.conv_act(u.conv_norm_out(h))
                    h = u.conv_out(h)
            return h, emb, ehs, res
        finally:
            self.masks._masks = {}


def gather_points(model: Model) -> list[str] | None:
    """Module paths of the transformer blocks a `PrefixUNet` gathers before (then one more before
    the up path), or None where the UNet is not laid out as that forward assumes. (Its forward
    leaves out class and added embeddings: `load_model` refuses UNets that take them.)"""
    from diffusers.models.unets.unet_2d_blocks import (CrossAttnDownBlock2D, DownBlock2D,
                                                       UNetMidBlock2DCrossAttn)

    u = model.unet
    cfg = u.config
    if (cfg.center_input_sample or not isinstance(u.mid_block, UNetMidBlock2DCrossAttn)
            or model.latent_size % 2 ** getattr(u, "num_upsamplers", 0)):
        return None
    points = []
    for i, block in enumerate(u.down_blocks):
        if type(block) not in (CrossAttnDownBlock2D, DownBlock2D):
            return None
        if isinstance(block, CrossAttnDownBlock2D):
            points += [f"down_blocks.{i}.attentions.{j}." for j in range(len(block.attentions))]
    points += [f"mid_block.attentions.{j}." for j in range(len(u.mid_block.attentions))]
    return points


def split_point(points: list[str]) -> int:
    """The gather point the search pass is cut at: after the transformer blocks of the first
    level that has them (the highest resolution, where attention costs most). Refinement walks
    the later layers first, and while it does, everything before the cut is the same in every
    pass: its states are kept from pass to pass (`HeadStates`)."""
    block = points[0].split(".attentions.")[0]
    return sum(q.split(".attentions.")[0] == block for q in points)


def head_layers(layers: list[tuple[str, int]], points: list[str], split: int) -> int:
    """How many of the value layers (in model order) lie before the cut: the head's."""
    return sum(1 for p, _ in layers if point_of(p, points) < split)


@dataclass(frozen=True)
class Cut:
    """A search pass cut at gather point `split` (`split_point`): how many value layers and mask
    columns lie before the cut, and the layouts (`PrefixLayout`) of the head and of the tail."""

    split: int
    n_head: int
    head_width: int
    head: "PrefixLayout"
    tail: "PrefixLayout"

    @classmethod
    def of(cls, layers: list[tuple[str, int]], points: list[str]) -> "Cut":
        split = split_point(points)
        n = head_layers(layers, points, split)
        return cls(split, n, sum(w for _, w in layers[:n]), PrefixLayout(layers[:n], points[:split]),
                   PrefixLayout(layers[n:], points[split:]))


def head_keys(rows: np.ndarray, row_bytes: Callable[[int], bytes], timestep: float,
              head_mask: np.ndarray) -> list[bytes]:
    """Each sample's head state, named by what determines it: its latent, prompt and timestep
    (`row_bytes(i)`: sample i's latent and prompt, hashed once per distinct row) and its masks
    before the cut."""
    digest: dict[int, bytes] = {}
    for i, r in enumerate(rows.tolist()):
        if r not in digest:
            digest[r] = hashlib.blake2b(row_bytes(i) + np.float32(timestep).tobytes(), digest_size=16).digest()
    bits = np.packbits(head_mask == 0, axis=1)
    return [digest[r] + bits[i].tobytes() for i, r in enumerate(rows.tolist())]


def distinct(keys: list[bytes]) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """The distinct keys in order of first appearance, each sample's index among them, and the
    first sample of each."""
    uniq: dict[bytes, int] = {}
    kid = np.array([uniq.setdefault(k, len(uniq)) for k in keys], dtype=np.int64)
    first = np.full(len(uniq), len(kid), dtype=np.int64)
    np.minimum.at(first, kid, np.arange(len(kid)))
    return list(uniq), kid, first


class HeadStates:
    """Head states (tuples of arrays or tensors) kept from pass to pass, least recently used
    dropped first beyond `cap` bytes. Thread-safe: two runs of a pass share it."""

    def __init__(self, cap: int = CACHE_BYTES):
        self.items: OrderedDict[bytes, tuple] = OrderedDict()
        self.bytes, self.cap = 0, cap
        self.lock = threading.Lock()
        self.computed = 0  # states computed (the rest came from here): for tests and benchmarks

    def __len__(self) -> int:
        return len(self.items)

    def get(self, keys: list[bytes]) -> list[tuple | None]:
        with self.lock:
            found = [self.items.get(k) for k in keys]
            for k, st in zip(keys, found):
                if st is not None:
                    self.items.move_to_end(k)
        return found

    def fetch(self, names: list[bytes], compute: Callable[[list[int]], list[tuple]]) -> list[tuple]:
        """The states named `names`: those kept, and the others computed (`compute(missing)`: the
        states for those indices of `names`, in order) and kept."""
        states = self.get(names)
        missing = [j for j, st in enumerate(states) if st is None]
        if missing:
            for j, st in zip(missing, compute(missing)):
                states[j] = st
            self.put([(names[j], states[j]) for j in missing])
        return states

    def put(self, items: list[tuple[bytes, tuple]]) -> None:
        with self.lock:
            self.computed += len(items)
            for k, st in items:
                if k not in self.items:
                    self.items[k] = st
                    self.bytes += sum(a.nbytes for a in st)
            while self.bytes > self.cap and len(self.items) > 1:
                _, old = self.items.popitem(last=False)
                self.bytes -= sum(a.nbytes for a in old)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.bytes = 0


def point_of(path: str, points: list[str]) -> int:
    """The gather point a value layer's rows come from: its own transformer block's, or for an
    up-path layer the one before the up path (len(points))."""
    return next((g for g, q in enumerate(points) if path.startswith(q)), len(points))


def row_ids(sample: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Each sample's (latent, prompt) row, numbered in order of first appearance."""
    seen: dict[bytes, int] = {}
    return np.array([seen.setdefault(sample[i].tobytes() + text[i].tobytes(), len(seen))
                     for i in range(len(sample))], dtype=np.int64)


class PrefixLayout:
    """The value masks of a pass as one (batch, width) matrix, and where a pass's candidates part."""

    def __init__(self, layers: list[tuple[str, int]], points: list[str] | None):
        self.layers = layers
        self.points = points
        self.width = sum(w for _, w in layers)
        self.offsets: dict[str, int] = {}
        at = 0
        for p, w in layers:
            self.offsets[p] = at
            at += w
        self.point_of = [point_of(p, points) for p, _ in layers] if points is not None else []

    def mask(self, sets: list[NeuronSet] | None, batch: int) -> np.ndarray:
        """(batch, width) ones, with a 0 for each neuron `sets[i]` deactivates in sample i."""
        m = np.ones((batch, self.width), dtype=np.float32)
        for i, s in enumerate(sets or ()):
            for path, rows in s.items():
                if rows:
                    m[i, [self.offsets[path] + r for r in rows]] = 0.0
        return m

    def tree(self, m: np.ndarray, rows: np.ndarray) -> "Tree":
        """What a pass computes at each level: level -1 is the distinct (latent, prompt) rows;
        level g (the transformer block after gather point g; g = len(points): the up path) is
        the distinct (row, masks of every layer up to that block). A level's states are numbered
        in order of (parent state, masks), so samples sorted by their last state lie in the order
        of the tree (`Tree.order`): every subtree contiguous."""
        _, rep, ids = np.unique(rows, return_index=True, return_inverse=True)
        ids = ids.reshape(-1)
        gathers, first = [], [rep]
        for g in range(len(self.points) + 1):
            cols = [self._cols(li) for li, pt in enumerate(self.point_of) if pt == g]
            # One byte string per sample: its parent state (big-endian, so that bytes sort as
            # numbers) and its masks at this level as bits. Sorting these is what keeps a
            # subtree's samples together, and it is fast at SD sizes (thousands of columns).
            key = np.concatenate([ids.astype(">i8")[:, None].view(np.uint8)]
                                 + [np.packbits(m[:, c] == 0, axis=1) for c in cols], axis=1)
            key = np.ascontiguousarray(key).view(np.dtype((np.void, key.shape[1]))).reshape(-1)
            _, at, new = np.unique(key, return_index=True, return_inverse=True)
            new = new.reshape(-1)
            gathers.append(ids[at])
            first.append(at)
            ids = new
        masks = [m[first[self.point_of[li] + 1], self._cols(li)] for li in range(len(self.layers))]
        return Tree(rep, gathers, masks, ids)

    def _cols(self, li: int) -> slice:
        path, w = self.layers[li]
        return slice(self.offsets[path], self.offsets[path] + w)


@dataclass
class Tree:
    """A pass laid out for `PrefixUNet`: `rep` the first sample of each distinct row (what goes
    in), `gathers[g]` each level-g state's parent state, `masks[li]` layer li's masks for the
    states of its level, `out[i]` the last-level state that is sample i's result."""

    rep: np.ndarray
    gathers: list[np.ndarray]
    masks: list[np.ndarray]
    out: np.ndarray

    @property
    def states(self) -> list[int]:
        """How many states each level computes, rows first: the pass's cost in units of levels."""
        return [len(self.rep)] + [len(g) for g in self.gathers]

    def order(self) -> np.ndarray:
        """The samples in the order of the tree."""
        return np.argsort(self.out, kind="stable")


class TorchPrefixUNet:
    """The search's UNet pass on torch with each block computed once per distinct state (`Tree`),
    cut at `split_point` as the search graph is: the head's states are kept from pass to pass
    (`HeadStates`), so a pass whose samples differ only after the cut runs the tail alone. Called
    as the Scorer calls a UNet (inputs on the model's device, in its dtype)."""

    def __init__(self, model: Model, points: list[str], cache_bytes: int = CACHE_BYTES):
        self.module = PrefixUNet(model, points).eval()
        layers = [(v.path, v.out_features) for v in model.value_layers]
        self.layout = PrefixLayout(layers, points)
        self.device = model.device
        self.cut = Cut.of(layers, points)
        self.cache = HeadStates(cache_bytes)

    @property
    def split(self) -> int:
        return self.cut.split

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 sets: list[NeuronSet] | None) -> torch.Tensor:
        b = len(sample)
        # Exact equality of whole rows: the search stacks copies of the same latents and embedding.
        _, xi = torch.unique(sample.reshape(b, -1), dim=0, return_inverse=True)
        _, ei = torch.unique(text.reshape(b, -1), dim=0, return_inverse=True)
        rows = (xi * b + ei).cpu().numpy()
        m = self.layout.mask(sets, b)
        t = float(timestep.reshape(-1)[0])
        # `head_keys` names each distinct row by its first sample: only those leave the device,
        # in one copy each for latents and text (on a GPU, one synchronization, not one per row).
        _, firsts = np.unique(rows, return_index=True)
        on_dev = torch.from_numpy(firsts).to(self.device)
        hx = dict(zip(firsts.tolist(), sample[on_dev].float().cpu().numpy()))
        he = dict(zip(firsts.tolist(), text[on_dev].float().cpu().numpy()))
        cut = self.cut
        names, kid, first = distinct(head_keys(rows, lambda i: hx[i].tobytes() + he[i].tobytes(), t,
                                               m[:, :cut.head_width]))

        def head(missing: list[int]) -> list[tuple[torch.Tensor, ...]]:
            i = first[missing]
            return self._head(sample[i], timestep, text[i], m[i, :cut.head_width], rows[i])

        states = self.cache.fetch(names, head)
        tree = cut.tail.tree(m[:, cut.head_width:], kid)  # level -1: the head states, in `names` order
        h, emb, ehs, *res = (torch.stack(parts) for parts in zip(*states))
        y = self.module.tail(cut.split, (h, emb, ehs, res), self._masks(tree), self._gathers(tree))
        return y if len(y) == b and np.array_equal(tree.out, np.arange(b)) else y[torch.from_numpy(tree.out).to(self.device)]

    def _head(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, m: np.ndarray,
              rows: np.ndarray) -> list[tuple[torch.Tensor, ...]]:
        """The head state of each sample (one sample per distinct key), each its own copy, so that
        a kept state holds its own memory and no other's."""
        split = self.cut.split
        tree = self.cut.head.tree(m, rows)
        r = torch.from_numpy(tree.rep).to(self.device)
        # The head's last level has no layers: its gather is the identity.
        h, emb, ehs, res = self.module.head(split, sample[r], timestep.to(self.device).expand(len(r)), text[r],
                                            self._masks(tree), self._gathers(tree)[:split])
        return [tuple(x[o].clone() for x in (h, emb, ehs, *res)) for o in tree.out.tolist()]

    def _masks(self, tree: Tree) -> list[torch.Tensor]:
        return [torch.from_numpy(x).to(self.device) for x in tree.masks]

    def _gathers(self, tree: Tree) -> list[torch.Tensor | None]:
        """The tree's gathers, one that keeps every state in order left out (None): no copy."""
        sizes = tree.states
        return [None if n == sizes[g] and np.array_equal(ix, np.arange(n)) else torch.from_numpy(ix).to(self.device)
                for g, (ix, n) in enumerate(zip(tree.gathers, sizes[1:]))]

    def clear(self) -> None:
        """Forget the kept head states."""
        self.cache.clear()

    def close(self) -> None:
        self.clear()
        self.module.masks.remove()


@torch.no_grad()
def same_as_diffusers(prefix: PrefixUNet, forward, inputs: dict[str, torch.Tensor], rtol: float = 1e-4,
                      atol: float = 1e-5) -> float | None:
    """The block-by-block forward against diffusers' (`forward(sample, timestep, text,
    masks)`), with every gather the identity: the largest difference where they disagree beyond
    the tolerance, else None. `inputs`: sample, timestep, encoder_hidden_states and mask_0, ...
    (other keys are ignored)."""
    n = len(inputs["sample"])
    masks = [inputs[k][:n] for k in inputs if k.startswith("mask_")]
    gathers = [torch.arange(n, device=inputs["sample"].device)] * (len(prefix.points) + 1)
    got = prefix(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], *masks, *gathers)
    want = forward(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], torch.cat(masks, dim=1))
    if torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
        return None
    return float((got.float() - want.float()).abs().max())
