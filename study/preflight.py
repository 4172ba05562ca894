"""Everything checkable about a launch, checked before anything is created.

The spec's own validation (`spec.py`) checks the spec alone; the checks here look at the world the study will
run in: the data, the pretrained weights, the stage store, the results directory, the Ray cluster. Each check
returns a list of problems ("field: what is wrong; how to fix it") and creates nothing: no study directory, no
MLflow experiment, no Ray session. `study launch` and `study resume` run them all and refuse (exit code 2) on
any problem.

A check is a function `check(ctx: Context) -> list[str]`; add one to `CHECKS` (storage and tracking-server
checks live in their own modules and are listed there too).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .paths import StudyPaths
from .spec import StudySpec, resolved_model_dict


class PreflightError(ValueError):
    """A launch that cannot work; `problems` holds one "field: problem; fix" message each."""

    def __init__(self, problems: list[str], source: str = "launch"):
        self.problems = problems
        super().__init__(f"{source}: " + (problems[0] if len(problems) == 1 else
                                           f"{len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems)))


@dataclass(frozen=True)
class Context:
    spec: StudySpec
    paths: StudyPaths
    address: str | None  # --address, else $RAY_ADDRESS, else None (a local Ray)
    data_shape: tuple[int, int, int] | None = None  # (in_channels, num_classes, image_size) of the built data
    document: dict | None = None  # the effective spec document (launch only; None on resume)


# -- checks ----------------------------------------------------------------------------------------------------


def check_pretrained(ctx: Context) -> list[str]:
    """`model.pretrained`: a weights name torchvision has for the encoder, or a .pth whose keys and shapes fit it."""
    import torch

    from trainables.models.vgg import vgg

    spec = ctx.spec
    name = spec.model.pretrained
    if not name:
        return []
    if spec.model.encoder != "vgg16":
        return [f"model.pretrained: torchvision weights exist for encoder 'vgg16' only, not "
                f"{spec.model.encoder!r}; set model.encoder: vgg16 or remove model.pretrained"]
    channels, classes, size = ctx.data_shape or _shape(spec)
    model = resolved_model_dict(spec.model, "baseline", channels, classes, size)
    with torch.device("meta"):  # shapes only, nothing allocated
        own = {k: tuple(v.shape) for k, v in vgg(model["encoder"], channels, classes, size, blocks=model["blocks"],
                                                  fc=model["fc"], dropout=model["dropout"]).state_dict().items()}
    if name.endswith((".pth", ".pt")):
        path = Path(name).expanduser()
        if not path.is_file():
            return [f"model.pretrained: no such file {name!r}; give the path of a torchvision vgg16 state dict "
                    "(.pth), or a weights name such as IMAGENET1K_V1"]
        try:
            state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 (any unreadable file is the same problem to the user)
            return [f"model.pretrained: {name!r} is not a readable PyTorch state dict ({type(exc).__name__}: {exc}); "
                    "give a .pth saved with torch.save(model.state_dict())"]
        if not isinstance(state, dict):
            return [f"model.pretrained: {name!r} holds a {type(state).__name__}, not a state dict; "
                    "save it with torch.save(model.state_dict())"]
        theirs = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
        where = repr(name)
    else:
        from torchvision.models import VGG16_Weights, vgg16

        known = [w.name for w in VGG16_Weights]
        if name not in known:
            return [f"model.pretrained: torchvision has no vgg16 weights named {name!r}; use one of {known} "
                    "or the path of a .pth file"]
        categories = VGG16_Weights[name].meta.get("categories")
        with torch.device("meta"):
            theirs = {k: tuple(v.shape) for k, v in vgg16(num_classes=len(categories or [0] * 1000)).state_dict().items()}
        if categories is None:  # feature-extractor weights: the head is not part of them
            own = {k: v for k, v in own.items() if k.startswith("features.")}
            theirs = {k: v for k, v in theirs.items() if k.startswith("features.")}
        where = f"torchvision's {name}"
    missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    wrong = sorted(k for k in set(own) & set(theirs) if own[k] != theirs[k])
    # Another number of classes than the weights': the model keeps its own last layer (load_pretrained_vgg16).
    heads = [k.rsplit(".", 1)[0] for k in own if k.startswith("classifier.")]
    last = max(heads, key=lambda p: int(p.split(".")[1]), default=None)
    wrong = [k for k in wrong if last is None or not k.startswith(last + ".")]
    if not (missing or unexpected or wrong):
        return []
    detail = "; ".join(filter(None, [
        f"shapes differ for {', '.join(f'{k} {theirs[k]} vs {own[k]}' for k in wrong[:3])}" if wrong else "",
        f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else ""]))
    return [f"model.pretrained: {where} does not fit this study's vgg16 ({channels} channel(s), {classes} classes, "
            f"{size}x{size} images): {detail}; use data with the weights' input and classes, or drop pretrained"]


def check_results_dir(ctx: Context) -> list[str]:
    """The study directory can be created (or written, if it exists) and holds no different study."""
    out = _writable_dir(ctx.paths.root, "results_dir", "pass --results-dir with a directory you can write")
    if not out and ctx.document is not None and ctx.paths.spec_file.exists():
        import yaml

        if yaml.safe_load(ctx.paths.spec_file.read_text()) != ctx.document:
            out.append(f"name: a different study named {ctx.spec.name!r} exists in {ctx.paths.root}; rename the "
                       f"study, remove that directory, or run `study resume {ctx.spec.name}` to continue it")
    return out


def check_store(ctx: Context) -> list[str]:
    """The stage store (`store`, default <results_dir>/store) is reachable and writable."""
    uri = ctx.paths.store_uri
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        return _writable_dir(path, "store", "set `store:` to a directory (or URI) you can write")
    return _writable_uri(uri, "store")


def check_address(ctx: Context) -> list[str]:
    """`--address` (or $RAY_ADDRESS) names a Ray cluster that answers."""
    address = ctx.address
    if not address or address in ("auto", "local"):
        return []  # local: Ray starts one; auto: Ray finds the running cluster (it says so if there is none)
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return [f"--address: {address!r} is not host:port (or ray://host:port); e.g. 10.0.0.5:6379, or 'auto' on "
                "a cluster node"]
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return []
    except OSError as exc:
        return [f"--address: no Ray cluster answers at {hostport} ({exc.strerror or exc}); start it (`ray start "
                "--head` or `ray up cluster.yaml`), or omit --address for a local Ray"]


# Storage URIs and the tracking server (issue 10) are checked in their own modules; list their checks here.
CHECKS: tuple[Callable[[Context], list[str]], ...] = (check_pretrained, check_results_dir, check_store, check_address)


def preflight(ctx: Context, checks=CHECKS) -> None:
    """Run every check; raise PreflightError with all their problems (nothing has been created)."""
    problems = [p for check in checks for p in check(ctx)]
    if problems:
        raise PreflightError(problems, ctx.paths.name)


# -- helpers ---------------------------------------------------------------------------------------------------


def _shape(spec: StudySpec) -> tuple[int, int, int]:
    from .spec import DATASET_SHAPES

    return DATASET_SHAPES.get(spec.data.dataset, (3, 1000, 224))


def _writable_dir(path: Path, field: str, fix: str) -> list[str]:
    """A directory that exists and is writable, or whose nearest existing ancestor is (it can be created)."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return [f"{field}: {existing} is a file, not a directory (needed for {path}); {fix}"]
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created ({existing} is not writable)"
        return [f"{field}: {path} {what}; {fix}"]
    return []


def _writable_uri(uri: str, field: str) -> list[str]:
    """A remote directory: the filesystem answers and a probe object can be written and removed."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        probe = f"{root.rstrip('/')}/.preflight-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:  # noqa: BLE001 (pyarrow raises many types; all mean "cannot use this URI")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [f"{field}: cannot write to {uri} ({first}); check the URI and its credentials"]
    return []
