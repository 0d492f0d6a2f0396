"""Export: the release bundle around a cleaned checkpoint — model card, self-contained HTML
report, SHA256SUMS and (optionally) checked ONNX exports. Reads only typed records and files;
nothing here depends on how localization found the neurons."""

from .bundle import SUMS_NAME, check_sha256sums, read_sha256sums, write_sha256sums
from .card import render_model_card, write_model_card
from .onnx import OnnxReport, export_text_encoder, export_unet, export_vae_decoder
from .records import ReleaseInfo
from .report import render_report, write_report

__all__ = ["SUMS_NAME", "OnnxReport", "ReleaseInfo", "check_sha256sums", "export_text_encoder", "export_unet",
           "export_vae_decoder", "read_sha256sums", "render_model_card", "render_report", "write_model_card",
           "write_report", "write_sha256sums"]
