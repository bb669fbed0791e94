"""The measurements the cost model may be fitted to, loaded from ``measurements.toml``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from waferllm.errors import HardwareError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore

KINDS = ("absolute", "claim")
CHECKS = ("at_least", "at_most", "between", "about")


@dataclass(frozen=True)
class Measurement:
    """One SPEC section 5 item: what was measured or claimed, and how the model is scored on it."""

    id: str
    system: str  # wafer preset name, or "gpu"
    kind: str  # absolute | claim
    quantity: str
    unit: str
    model: str  # evaluator name in waferllm.calibration.targets
    source: str
    value: float | None = None
    tolerance: float | None = None  # relative, for absolute and "about"
    check: str | None = None  # claims only
    low: float | None = None
    high: float | None = None
    args: dict = field(default_factory=dict, hash=False)

    @property
    def absolute(self) -> bool:
        return self.kind == "absolute"

    def shown(self) -> str:
        """The measured figure or the claim, as a reader would quote it."""
        if self.check == "between":
            return f"{format_value(self.low, self.unit)} - {format_value(self.high, self.unit)}"
        prefix = {"at_least": ">= ", "at_most": "<= ", "about": "~"}.get(self.check or "", "")
        return prefix + format_value(self.value, self.unit)

    def error(self, model_value: float) -> float:
        """Relative error of the model against the measured value (absolute items and 'about' claims)."""
        ref = self.value if self.value is not None else math.sqrt(self.low * self.high)
        return model_value / ref - 1.0

    def passes(self, model_value: float) -> bool:
        if self.kind == "absolute" or self.check == "about":
            return abs(self.error(model_value)) <= self.tolerance
        if self.check == "at_least":
            return model_value >= self.value
        if self.check == "at_most":
            return model_value <= self.value
        return self.low <= model_value <= self.high

    def residual(self, model_value: float) -> float:
        """Log-space residual: 0 when satisfied for claims, the log ratio for absolute values."""
        v = max(model_value, 1e-30)
        if self.kind == "absolute":
            return math.log(v / max(self.value, 1e-30))
        if self.check == "about":
            return 0.0 if self.passes(model_value) else math.log(v / self.value)
        if self.check == "at_least":
            return min(0.0, math.log(v / self.value))
        if self.check == "at_most":
            return max(0.0, math.log(v / self.value))
        return min(0.0, math.log(v / self.low)) + max(0.0, math.log(v / self.high))


def format_value(v: float | None, unit: str) -> str:
    """A value as a reader would quote it, in its unit."""
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1e6:.3g} us" if v < 1e-3 else f"{v * 1e3:.3g} ms"
    if unit == "fraction":
        return f"{v * 100:.0f}%"
    if unit == "x":
        return f"{v:.3g}x"
    return f"{v:,.6g} {unit}"


def default_path() -> Path:
    return Path(str(resources.files("waferllm.hardware") / "measurements.toml"))


def load_measurements(path: str | Path | None = None, system: str | None = None) -> list[Measurement]:
    """Every measurement in the file (optionally only one system's), validated."""
    path = Path(path) if path else default_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise HardwareError(f"{path}: cannot read the measurements: {exc}") from None
    out = []
    for i, raw in enumerate(data.get("measurement", [])):
        where = f"{path}: measurement {i + 1} ({raw.get('id', '?')})"
        fields = {f.name for f in dataclasses.fields(Measurement)}
        required = {f.name for f in dataclasses.fields(Measurement)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if set(raw) - fields:
            raise HardwareError(f"{where}: unknown key(s) {', '.join(sorted(set(raw) - fields))}; "
                                f"known: {', '.join(sorted(fields))}")
        if required - set(raw):
            raise HardwareError(f"{where}: missing key(s) {', '.join(sorted(required - set(raw)))}")
        m = Measurement(**raw)
        if m.kind not in KINDS:
            raise HardwareError(f"{where}: kind must be one of {', '.join(KINDS)}, got {m.kind!r}")
        if m.kind == "absolute" and (m.value is None or not m.tolerance):
            raise HardwareError(f"{where}: an absolute measurement needs a value and a tolerance")
        if m.kind == "claim":
            if m.check not in CHECKS:
                raise HardwareError(f"{where}: a claim needs check = one of {', '.join(CHECKS)}")
            if m.check == "between" and (m.low is None or m.high is None):
                raise HardwareError(f"{where}: a 'between' claim needs low and high")
            if m.check == "about" and (m.value is None or not m.tolerance):
                raise HardwareError(f"{where}: an 'about' claim needs a value and a tolerance")
        out.append(m)
    ids = [m.id for m in out]
    if len(set(ids)) != len(ids):
        raise HardwareError(f"{path}: duplicate measurement ids")
    return [m for m in out if system is None or m.system == system]
