"""TrainConfig: everything a training run reads, from a YAML/JSON file plus `section.key=value` overrides.

    model:  which network (a preset, a config.json, or weights to start from) and field overrides
    data:   the prepared token directory, sequence length, global batch, gradient accumulation
    optim:  AdamW (the M1 report's b2=0.95, eps=1e-15 are the defaults), schedule, clipping
    loss:   MoE load-balancing and router z-loss coefficients
    run:    steps, seed, output directory, precision, remat, mesh, checkpoint and logging cadence
    rl:     rollouts and the CISPO objective of `m1jax train rl` (unused by supervised training)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from m1jax.config import ModelConfig, get_preset
from m1jax.sharding import AXES


class TrainConfigError(ValueError):
    """A training config value that cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    preset: str | None = None  # an m1jax preset name
    config_file: str | None = None  # or a Hugging Face config.json
    init_from: str | None = None  # or weights to fine-tune (anything m1jax.from_pretrained reads)
    overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields to change


@dataclasses.dataclass(frozen=True)
class DataSection:
    path: str = ""  # a directory written by `m1jax train prepare`
    seq_len: int = 2048
    batch_size: int = 8  # sequences per optimizer step, over all devices and accumulation steps
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4
    schedule: str = "cosine"  # "cosine" (warmup then cosine to lr * min_lr_ratio) or "constant" (after warmup)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-15
    weight_decay: float = 0.1  # not applied to norm weights
    clip_norm: float | None = 1.0  # global gradient-norm clipping; None disables


@dataclasses.dataclass(frozen=True)
class LossSection:
    aux_coef: float | None = None  # MoE load-balancing coefficient; None: the model's router_aux_loss_coef
    z_coef: float = 0.0  # router z-loss coefficient


@dataclasses.dataclass(frozen=True)
class RunSection:
    steps: int = 1000
    seed: int = 0
    dir: str = "runs/default"
    compute_dtype: str = "bfloat16"  # parameters stay fp32 (master weights); matmuls run in this dtype
    remat: str = "none"  # "none", "full" (recompute each cycle), "dots" (keep matmul outputs), "sublayers"
    mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1})  # m1jax.sharding.make_mesh axis sizes
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_every: int = 10
    max_nonfinite: int = 5  # stop after this many consecutive skipped (non-finite) steps
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class RLSection:
    """`m1jax train rl` (CISPO, train/rl.py): run.steps counts optimizer updates, `updates` per rollout batch."""

    task: str = "arithmetic"  # prompts and a verifiable reward (train.rl.TASKS)
    prompts: int = 16  # prompts per rollout batch
    group_size: int = 8  # completions sampled per prompt; advantages are relative within the group
    max_new_tokens: int = 64
    updates: int = 4  # optimizer updates per rollout batch, on all of it (M1: 16 off-policy rounds)
    eps_high: float = 4.0  # IS weight cap: sg(min(r, 1 + eps_high)); M1 does not disclose its value
    eps_low: float | None = None  # lower cap 1 - eps_low; None: no lower bound (M1)


SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "loss": LossSection,
            "run": RunSection, "rl": RLSection}
SCHEDULES = ("cosine", "constant")
REMAT = ("none", "full", "dots", "sublayers")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    loss: LossSection = LossSection()
    run: RunSection = RunSection()
    rl: RLSection = RLSection()

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> TrainConfig:
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise TrainConfigError(f"{where}: unknown section(s) {unknown}; expected {sorted(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = d.get(name) or {}
            if not isinstance(values, dict):
                raise TrainConfigError(f"{where}: section {name!r} must be a mapping, got {values!r}")
            fields = {f.name: f for f in dataclasses.fields(section_cls)}
            bad = sorted(set(values) - set(fields))
            if bad:
                raise TrainConfigError(f"{where}: unknown field(s) {[f'{name}.{b}' for b in bad]}")
            sections[name] = section_cls(**{k: _coerce(f"{where}: {name}.{k}", v, fields[k].type)
                                            for k, v in values.items()})
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
        """Read a .yaml/.json file and apply `section.key=value` overrides (values parsed as YAML)."""
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"{path}: no such training config file")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{path}: not valid YAML/JSON ({e})") from None
        if not isinstance(d, dict):
            raise TrainConfigError(f"{path}: the top level must be a mapping of sections")
        return cls.from_dict(apply_overrides(d, overrides), str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: dict) -> TrainConfig:
        """A copy with some fields changed: `cfg.replace(run={"steps": 10})`."""
        return TrainConfig(**{name: dataclasses.replace(getattr(self, name), **sections.get(name, {}))
                              for name in SECTIONS})

    def model_config(self) -> ModelConfig:
        """The network of a fresh run, with fp32 parameters (the master weights; run.compute_dtype sets the
        matmul dtype). Runs that start from weights (model.init_from) take the config stored with them."""
        m = self.model
        if m.init_from is not None:
            raise TrainConfigError("model.init_from: the config comes with the weights; load them instead")
        base = ModelConfig.from_hf(m.config_file) if m.config_file is not None else get_preset(m.preset)
        return base.replace(**{**m.overrides, "dtype": "float32"})

    def validate(self) -> None:
        def need(ok: bool, field: str, msg: str):
            if not ok:
                raise TrainConfigError(f"train config {field}: {msg}")

        m, d, o, r = self.model, self.data, self.optim, self.run
        need(sum(x is not None for x in (m.preset, m.config_file, m.init_from)) == 1, "model",
             "give exactly one of model.preset, model.config_file, model.init_from")
        for name in ("seq_len", "batch_size", "grad_accum"):
            need(getattr(d, name) > 0, f"data.{name}", f"must be positive, got {getattr(d, name)}")
        need(d.batch_size % d.grad_accum == 0, "data.grad_accum",
             f"batch_size={d.batch_size} is not a multiple of grad_accum={d.grad_accum}")
        need(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r} not in {SCHEDULES}")
        need(o.lr > 0 and o.warmup_steps >= 0 and 0 <= o.min_lr_ratio <= 1, "optim",
             "need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1")
        need(0 <= o.b1 < 1 and 0 <= o.b2 < 1 and o.eps >= 0, "optim", "need 0 <= b1, b2 < 1 and eps >= 0")
        need(o.clip_norm is None or o.clip_norm > 0, "optim.clip_norm", f"must be > 0 or null, got {o.clip_norm}")
        need(r.compute_dtype in ("float32", "bfloat16", "float16"), "run.compute_dtype",
             f"{r.compute_dtype!r} not in (float32, bfloat16, float16)")
        need(r.remat in REMAT, "run.remat", f"{r.remat!r} not in {REMAT}")
        need(set(r.mesh) <= set(AXES), "run.mesh", f"axes {sorted(set(r.mesh) - set(AXES))} are not among {AXES}")
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "max_nonfinite"):
            need(getattr(r, name) > 0, f"run.{name}", f"must be positive, got {getattr(r, name)}")
        rl = self.rl
        for name in ("prompts", "group_size", "max_new_tokens", "updates"):
            need(getattr(rl, name) > 0, f"rl.{name}", f"must be positive, got {getattr(rl, name)}")
        need(rl.eps_high > 0 and (rl.eps_low is None or 0 < rl.eps_low <= 1), "rl",
             f"need eps_high > 0 and eps_low null or in (0, 1], got {rl.eps_high}, {rl.eps_low}")


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`section.key=value` strings applied to a config dict (a copy); `model.overrides.hidden_size=64` nests."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise TrainConfigError(f"override {item!r}: expected section.key=value (e.g. run.steps=100)")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return d


def _coerce(where: str, value, annotation: str):
    """YAML reads `1e-3` as a string and `3` where a float is meant as an int; fix those, refuse the rest."""
    if value is None:
        if "None" not in annotation:
            raise TrainConfigError(f"{where} may not be null")
        return None
    kind = annotation.split(" | ")[0]
    try:
        if kind == "float":
            return float(value)
        if kind == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
    except (TypeError, ValueError):
        raise TrainConfigError(f"{where}: expected {kind}, got {value!r}") from None
    expected = {"str": str, "bool": bool, "dict": dict}[kind]
    if not isinstance(value, expected):
        raise TrainConfigError(f"{where}: expected {kind}, got {value!r}")
    return value
