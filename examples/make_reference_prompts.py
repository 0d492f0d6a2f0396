"""Writes the bundled reference prompts (`src/nemo_surgery/data/reference_prompts.txt`): 500
generic captions of everyday scenes, for calibrating when no `--reference` is given.

    python examples/make_reference_prompts.py > src/nemo_surgery/data/reference_prompts.txt

Composed from short lists (subject, place or light, picture style) with a fixed seed, so the file
is reproducible and contains no caption taken from any dataset. Such captions are not memorized
by a model trained on real image-text data; on a model trained on a narrow caption set they are
out of its distribution, and prompts from its own training data (never memorized) calibrate
theta_mem more tightly (README, "Reference prompts").
"""

from __future__ import annotations

import random

SEED = 2406  # the paper's arXiv number, nothing tuned
COUNT = 500

SUBJECTS = [
    "a dog", "two cats", "a horse", "a small boat", "a red bicycle", "an old car", "a wooden chair", "a bowl of soup",
    "a cup of tea", "a loaf of bread", "a child", "an old man", "a woman", "a group of friends", "a farmer", "a chef",
    "a musician", "a lighthouse", "a bridge", "a train", "a bus", "a kite", "a tree", "a field of flowers", "a garden",
    "a mountain cabin", "a city street", "a market stall", "a kitchen", "a living room", "a library", "a classroom",
    "a bakery", "a harbor", "a waterfall", "a forest path", "a desert road", "a snowy village", "a wheat field",
    "a pair of shoes", "a backpack", "a guitar", "a laptop", "a bookshelf", "a vase of tulips", "a plate of pasta",
    "a birthday cake", "a sandwich", "a bird", "a flock of sheep", "a cow", "a duck", "a fox", "a deer", "a rabbit",
    "a fishing boat", "a sailboat", "an airplane", "a tractor", "a motorcycle", "a wooden table", "a lamp",
    "a clock tower", "a church", "a castle", "a windmill", "a stone wall", "a fountain", "a park bench",
    "a playground", "a tennis court", "a soccer game", "a surfer", "a skier", "a runner", "a cyclist",
    "a street musician", "a painter", "a baker", "a teapot", "a basket of apples", "a bunch of bananas", "a pumpkin",
    "a sunflower", "a cactus", "a palm tree", "a river", "a lake", "a beach", "a cliff", "a valley", "a hill",
    "an island", "a canyon", "a meadow", "a pond",
]
PLACES = [
    "in the morning light", "at sunset", "on a rainy day", "in winter", "in autumn", "in spring", "at night",
    "under a cloudy sky", "near the sea", "in a small town", "in the countryside", "by the window",
    "on a wooden floor", "in a busy city", "next to a river", "in the mountains", "in a park", "on a table",
    "in the snow", "in the fog", "on a summer afternoon", "at the market", "in front of a house",
    "on a quiet street", "in a garden", "on the grass",
]
STYLES = [
    "a photo of", "a close-up photo of", "a black and white photo of", "a painting of", "a watercolor of",
    "a pencil sketch of", "an illustration of", "a wide shot of", "a blurry photo of", "a postcard of",
    "a poster of", "an oil painting of", "a cartoon of", "a picture of", "a snapshot of", "a drawing of",
]
FORMS = ["{s} {p}", "{st} {s} {p}", "{st} {s}", "{s}"]


def reference_prompts(seed: int = SEED, count: int = COUNT) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        c = rng.choice(FORMS).format(s=rng.choice(SUBJECTS), p=rng.choice(PLACES), st=rng.choice(STYLES))
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


if __name__ == "__main__":
    print("\n".join(reference_prompts()))
