"""Named TorchX job profiles from ``torchx.yaml`` (read by ``deploy.components.train``).

The TorchX CLI never reads ``torchx.yaml``; it is ours. Layout::

    profiles:
      NAME:
        description: str          # one line, shown in errors
        image: str                # container image (ignored by local_cwd)
        j: "NNODESxNPROC"         # [min:]nodes x procs per node, as torchx dist.ddp
        h: str                    # named resource (e.g. aws_p4d_24xlarge); wins over cpu/gpu/memMB
        cpu: int                  # per node (replica)
        gpu: int
        memMB: int
        env: {KEY: value}         # extra environment for every rank
        config: str               # trainer YAML, relative to the working directory / image WORKDIR
        overrides: [str]          # trainer overrides ``--section.field=value`` applied first
        metrics_port: int         # base port (rank r serves base + local rank); 0 = metrics off
        metrics_host: str         # bind address inside the job (0.0.0.0 so pods can be scraped)
        max_retries: int          # scheduler retries of the whole job
        max_restarts: int         # torchrun --max-restarts (elastic restarts of the worker group)
        rdzv_port: int            # c10d rendezvous port on rank 0's host (multi-node)
        mounts: [str]             # torchx mount specs, e.g. type=bind,src=/data,dst=/data

File lookup: ``$TAILREC_TORCHX_PROFILES``, else ``./torchx.yaml``, else the repository root.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

ENV_PROFILES = "TAILREC_TORCHX_PROFILES"
_J = re.compile(r"^(\d+:)?\d+x\d+$")


class ProfileError(ValueError):
    """Bad or unknown profile; the message names the file and the key."""


@dataclass
class Profile:
    name: str
    description: str = ""
    image: str = "tailrec:0.1"
    j: str = "1x2"
    h: str | None = None
    cpu: int = 2
    gpu: int = 0
    memMB: int = 4096
    env: dict[str, str] = field(default_factory=dict)
    config: str = "configs/movielens_deepfm.yaml"
    overrides: list[str] = field(default_factory=list)
    metrics_port: int = 9400
    metrics_host: str = "127.0.0.1"
    max_retries: int = 0
    max_restarts: int = 0
    rdzv_port: int = 29500
    mounts: list[str] = field(default_factory=list)

    @property
    def nproc_per_node(self) -> int:
        return int(self.j.split("x")[-1])

    def validate(self, where: str) -> None:
        if not _J.match(self.j):
            raise ProfileError(f"{where}.j: {self.j!r} is not [MIN:]NODESxPROCS, e.g. 1x2 or 2x8")
        for k in ("cpu", "gpu", "memMB", "max_retries", "max_restarts"):
            if getattr(self, k) < 0:
                raise ProfileError(f"{where}.{k}: must be >= 0")
        if not 0 <= self.metrics_port <= 65535 - self.nproc_per_node:
            raise ProfileError(f"{where}.metrics_port: {self.metrics_port} + local ranks must fit in 0..65535")
        for k, v in self.env.items():
            if "," in v:  # srun --export=ALL,K=V,... and torchx's `--env K=V,K2=V2` split on commas
                raise ProfileError(f"{where}.env.{k}: value {v!r} must not contain ','")
        for o in self.overrides:
            if not o.startswith("--") or "=" not in o:
                raise ProfileError(f"{where}.overrides: {o!r} is not --section.field=value")


_TYPES = {f.name: f.type for f in fields(Profile) if f.name != "name"}
_SCALARS = {"str": str, "int": int, "str | None": str}


def _check_type(where: str, key: str, value):
    tp = _TYPES[key]
    if tp.startswith("dict"):
        if not isinstance(value, dict):
            raise ProfileError(f"{where}.{key}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}  # env values are strings to the OS anyway
    if tp.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProfileError(f"{where}.{key}: expected a list of strings, got {value!r}")
        return list(value)
    want = _SCALARS[tp]
    if value is None and tp.endswith("None"):
        return None
    if not isinstance(value, want) or isinstance(value, bool):
        raise ProfileError(f"{where}.{key}: expected {want.__name__}, got {value!r}")
    return value


def find_profiles_file() -> Path:
    candidates = [os.environ.get(ENV_PROFILES), "torchx.yaml", Path(__file__).resolve().parents[1] / "torchx.yaml"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise ProfileError(f"torchx.yaml not found (set ${ENV_PROFILES}, or run from the repository root)")


def load_profiles(path: str | Path | None = None) -> dict[str, Profile]:
    path = Path(path) if path else find_profiles_file()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: cannot parse: {e}") from None
    if not isinstance(data, dict) or set(data) != {"profiles"} or not isinstance(data["profiles"], dict):
        raise ProfileError(f"{path}: top level must be exactly one mapping 'profiles: {{NAME: {{...}}}}'")
    out = {}
    for name, body in data["profiles"].items():
        where = f"{path}: profiles.{name}"
        if not isinstance(body, dict):
            raise ProfileError(f"{where}: expected a mapping")
        unknown = sorted(set(body) - set(_TYPES))
        if unknown:
            raise ProfileError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TYPES)}")
        prof = Profile(name=str(name), **{k: _check_type(where, k, v) for k, v in body.items()})
        prof.validate(where)
        out[str(name)] = prof
    return out


def get_profile(name: str, path: str | Path | None = None) -> Profile:
    profiles = load_profiles(path)
    if name not in profiles:
        known = ", ".join(f"{n} ({p.description})" if p.description else n for n, p in profiles.items())
        raise ProfileError(f"unknown profile {name!r}; known profiles: {known}")
    return profiles[name]
