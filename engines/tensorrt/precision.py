"""How the installed TensorRT takes reduced precision: weakly typed builder flags, or a
strongly typed network whose precision is in the ONNX graph.

TensorRT 10.12 deprecated weak typing and 11.0 removed it: no BuilderFlag.FP16, BF16 or
INT8, no NetworkDefinitionCreationFlag.EXPLICIT_BATCH, and every network is strongly typed
(STRONGLY_TYPED is kept there, documented as ignored). So from 10.12 outpost builds strongly
typed networks, and for fp16 converts the graph to fp16 first (fp32 inputs and outputs
kept: ``engines.tensorrt.convert``); before 10.12 it sets the builder flags, as TensorRT
8.5 to 10.11 (JetPack 5 and 6) expect. Both generations stay supported.

Pure: decided from the version string and the profile's precision, no TensorRT import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from engines.errors import PrepareError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
STRONG_TYPING_FROM = (10, 12)  # the first TensorRT that deprecated the precision flags


@dataclass(frozen=True)
class PrecisionPath:
    """What a build does for one precision on one TensorRT version, and why."""

    precision: str
    trt_version: str
    trt_major: int
    typing: str  # "strong" | "weak"
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag members to set
    builder_flags: tuple[str, ...]  # BuilderFlag members to set (weak typing only)
    convert_to: str | None  # the graph is converted to this precision before parsing
    converter: str = ""  # "<package> <version>" once the converter is loaded
    reason: str = ""

    def with_converter(self, converter: str) -> PrecisionPath:
        return replace(self, converter=converter)

    def cache_fields(self) -> dict:
        """What the engine cache key and a plan's sidecar carry of this path: a plan from
        the other generation or typing mode, or from another converter, is never reused."""
        return {"trt_major": self.trt_major, "typing": self.typing,
                "converter": self.converter or None}

    def describe(self) -> str:
        """One line for `outpost compile` and `outpost info`."""
        if self.typing == "weak":
            how = ("weakly typed network, builder flags "
                   + (", ".join(self.builder_flags) if self.builder_flags else "none"))
        elif self.convert_to:
            how = (f"strongly typed network, graph converted to {self.convert_to} by "
                   f"{self.converter or 'the converter'} (fp32 inputs and outputs kept)")
        else:
            how = "strongly typed network, precision as the graph has it"
        return f"{self.precision}: {how}, TensorRT {self.trt_version}; {self.reason}"


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as '10.13.0.35'."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if m is None:
        raise PrepareError(f"cannot read the TensorRT version {version!r}: expected "
                           f"MAJOR.MINOR...; reinstall TensorRT's Python package")
    return int(m.group(1)), int(m.group(2))


def precision_path(trt_version: str, precision: str, typing: str | None = None
                   ) -> PrecisionPath:
    """The build path for ``precision`` on this TensorRT (PrepareError for a bad name).

    ``typing`` ("weak" or "strong") forces a mode where this TensorRT has both (10.x), for
    build/gpu_check; None follows the version.
    """
    if precision not in PRECISIONS:
        raise PrepareError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    major, minor = parse_version(trt_version)
    if typing not in (None, "weak", "strong"):
        raise PrepareError(f"typing {typing!r}: use weak or strong")
    if typing == "weak" and major >= 11:
        raise PrepareError(f"TensorRT {trt_version} builds strongly typed networks only (11.0 "
                           f"removed weak typing)")
    if typing == "strong" and major < 10:
        raise PrepareError(f"outpost builds strongly typed networks on TensorRT 10 and later, "
                           f"not {trt_version}")
    if typing == "weak" or (typing is None and (major, minor) < STRONG_TYPING_FROM):
        flags = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",),
                 # layers left unquantized may use fp16
                 "int8": ("INT8", "FP16")}[precision]
        return PrecisionPath(
            precision, str(trt_version), major, "weak",
            ("EXPLICIT_BATCH",) if major < 10 else (),  # the default (then ignored) from 10
            flags, None,
            reason="weak typing asked for" if typing else
                   f"TensorRT before {_dotted(STRONG_TYPING_FROM)} chooses layer precisions "
                   f"itself from the builder flags")
    network = () if major >= 11 else ("STRONGLY_TYPED",)
    why = ("TensorRT 11 removed the precision builder flags: every network is strongly typed"
           if major >= 11 else
           "strong typing asked for" if (major, minor) < STRONG_TYPING_FROM else
           f"TensorRT {_dotted(STRONG_TYPING_FROM)} deprecated the precision builder flags "
           f"for strongly typed networks")
    if precision in ("fp16", "bf16"):
        return PrecisionPath(precision, str(trt_version), major, "strong", network, (),
                             precision, reason=why)
    if precision == "int8":
        why += ("; the Q/DQ nodes make their layers int8, the rest runs in the graph's own "
                "types")
    return PrecisionPath(precision, str(trt_version), major, "strong", network, (), None,
                         reason=why)


def check_model_fits(path: PrecisionPath, quantized: bool, model: str) -> None:
    """The rule for explicitly quantized (Q/DQ) models, the same on both generations.

    int8 needs Q/DQ nodes (outpost does not calibrate). A Q/DQ model under fp16 or bf16 is
    refused: its quantization is its author's choice of precision, and converting the float
    graph around it would change its scales' types and so its numbers; it belongs on a
    profile with precision int8.
    """
    if path.precision == "int8" and not quantized:
        raise PrepareError(
            f"precision int8 needs an explicitly quantized model (QuantizeLinear/"
            f"DequantizeLinear nodes) and {model} has none: quantize it first, or build "
            f"with precision fp16")
    if path.precision in ("fp16", "bf16") and quantized:
        raise PrepareError(
            f"{model} is explicitly quantized (QuantizeLinear/DequantizeLinear nodes), so "
            f"its precision is already chosen, and the profile asks for {path.precision}: "
            f"serve it with a profile whose precision is \"int8\", or give this device the "
            f"model before quantization")


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))
