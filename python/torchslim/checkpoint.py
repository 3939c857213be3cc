"""save_compressed / load_compressed: a patched model as one safetensors file, reloaded into a freshly
built dense model without running the compression again and without pickle.

The file (format version 1)
---------------------------
One safetensors file (the path is the file; ``.safetensors`` is the usual suffix). Why one file and
not a directory: safetensors already has a header for str -> str metadata, so the per-layer
configs travel with the tensors they describe, and cannot be separated from them or paired with the
wrong ones; safetensors holds raw tensor bytes and a JSON header only, so loading runs no code.

Tensors: the model's whole ``state_dict()``. The compressed layers' buffers in their canonical form
(``Int8Linear``: ``weight`` (N, K) int8, ``weight_scale``, ``bias``, ``smooth_scale``;
``Sparse24Linear``: ``values``, ``metadata``, ``bias``; ``CSRLinear``: ``crow``, ``col``, ``values``,
``bias``; ``LowRankLinear``: ``V``, ``U``, ``bias``) and every other parameter and persistent buffer,
so that loading gives the whole model. Each is stored once (safetensors refuses shared storage): a
layer reachable under several names (shared) is stored under its first name; a tensor the model
holds under several names (tied embeddings) is stored under one and its other names are listed in
``tied``; a tensor that shares storage with another in any other way is stored as its own copy.

Metadata: under the key ``"torchslim"``, a JSON object::

    {"format_version": 1, "torchslim_version": "0.1.0",
     "layers": [{"names": ["encoder.layer.0.attention.self.query"], "class": "Int8Linear",
                 "in_features": 32, "out_features": 32, "bias": true, "dtype": "bfloat16",
                 "smooth": false}, ...],
     "tied": {"lm_head.weight": "model.embed_tokens.weight"}}

Each layer: every name it is reachable under, its class, and its constructor facts (the class's
``_layer_spec()``): in/out features, bias, the float dtype of the replaced layer, and per class
``smooth`` (Int8Linear: a SmoothQuant scale is stored), ``rank`` (LowRankLinear), ``nnz`` and
``index_dtype`` (CSRLinear: the number of stored values and the dtype of ``col``); Sparse24Linear
needs nothing more (its buffers' shapes follow from in/out features). A reader refuses a file of
another ``format_version``.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from itertools import chain

import torch
from torch import nn

from .nn._compressed import dtype_name
from .patch import _PATCHED_TYPES, _sites, _swap_all

FORMAT_VERSION = 1
_KEY = "torchslim"  # the safetensors metadata key of the JSON header
_CLASSES = {cls.__name__: cls for cls in _PATCHED_TYPES}
_COMMON = ("in_features", "out_features", "bias", "dtype")


def save_compressed(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes model (patched by patch_model, or any model holding torchslim layers) to path as one
    safetensors file: the whole state_dict plus, in the header's metadata, a JSON record of every
    torchslim layer (its names, class and constructor facts; the format is described in this
    module's docstring). No pickle. load_compressed(fresh_dense_model, path) rebuilds the model
    bit-exactly.

    The file is written next to path and renamed into place, so a failed save leaves no partial
    file (and an existing file at path as it was); it gets the mode of the file it replaces, else the
    default mode of a new file (0o666 less the umask). Refused: a model holding tensors on the meta
    device (no values), sparse tensors or non-tensor extra state (safetensors stores dense tensors
    only), and subclasses of the torchslim layers (the reader could not rebuild them). A model
    without torchslim layers is saved too (an empty ``layers`` list)."""
    caller = "save_compressed"
    sites = _sites(model, lambda m: isinstance(m, _PATCHED_TYPES), caller)
    layers = []
    for module, names in sites.values():
        if type(module) not in _PATCHED_TYPES:
            raise TypeError(f"{caller}: {names[0]} is a {type(module).__name__}, a subclass of a torchslim layer; "
                            f"the file records only {', '.join(_CLASSES)}, which load_compressed can rebuild")
        layers.append({"names": list(names), "class": type(module).__name__, **module._layer_spec()})

    state = model.state_dict()
    aliases = tuple(f"{name}." for layer in layers for name in layer["names"][1:])
    if aliases:  # a shared layer's tensors once, under its first name
        state = {key: t for key, t in state.items() if not key.startswith(aliases)}
    problems = [f"{key}: {_not_storable(t)}" for key, t in state.items() if _not_storable(t)]
    if problems:
        raise ValueError(f"{caller}: safetensors stores dense tensors with values only; "
                         + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    tensors, tied = _unshared(state)
    header = {"format_version": FORMAT_VERSION, "torchslim_version": _version(), "layers": layers, "tied": tied}
    _write(tensors, {"format": "pt", _KEY: json.dumps(header)}, os.fspath(path))


def load_compressed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a file of save_compressed into model, a freshly built dense model of the same
    architecture (e.g. ``BertModel(config)``, in the file's dtype; or built on the meta device, see
    below), and returns it (changed in place).

    At every name of each recorded layer the model must hold one nn.Linear (the same module at all
    the names of a shared layer, and at no other) of the recorded in/out features, bias and dtype;
    an empty layer of the recorded class is built on its device (``_from_layer_spec``), loads its
    tensors with ``load_state_dict(strict=True)`` (the layer's own checks of shapes, dtypes, format
    invariants and finite values; CSRLinear and LowRankLinear take the file's nnz and rank;
    Int8Linear lays out its weight for its device), must then have the recorded facts, and is
    swapped in at every name (with the Linear's hooks, as patch_model does). A model already patched
    the same way (the recorded class at those names, e.g. patch_model run on a meta model) is
    accepted: its layers are replaced alike. Every other tensor is loaded with
    ``load_state_dict``; its keys are checked first against the file's, strictly (none missing, none
    extra), with their shapes and dtypes (no cast: the round trip is bit-exact). The model's ties
    (a parameter or buffer held under several names, e.g. tied word embeddings) must be the file's
    ``tied``: a tie on one side only is refused, naming the tensors (one would overwrite the other).

    A model on the meta device is loaded with ``assign=True``: it takes the file's tensors, on the
    CPU (move it after); tied parameters stay tied. Its non-persistent buffers (BERT's
    ``position_ids``, a rotary embedding's ``inv_freq``) are in no state_dict, so no file can give
    them values: a meta model that still holds any on meta is refused, naming them. Build such a
    model on the CPU, or give those buffers their values (on the CPU) before loading.

    All or nothing: every check runs, and every compressed layer is built and loaded on the side,
    before the model changes; a failure raises a ValueError (TypeError for a model that is not an
    nn.Module) saying what does not match, and leaves the model as it was. (After the checks only
    the copies of the dense tensors remain, which fail only on a device or memory error; then the
    layers are swapped back, but tensors already copied stay.) Refused: a file that is
    not safetensors or has no torchslim header, another format version, an unknown layer class, a
    layer name the model lacks or that is not an nn.Linear there, other features / bias / dtype, a
    shared layer that the model does not share alike, a model already patched otherwise, tensors
    missing or extra, ties that differ, tensors a layer refuses, a header that disagrees with its
    tensors (every count in it is checked against the stored shapes before anything is allocated), and
    a meta model with non-persistent buffers on meta."""
    caller = "load_compressed"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    header, stored = _read(path, caller)
    layers, tied = _parse_header(header, stored, path, caller)
    state = dict(stored)
    state.update({alias: stored[key] for alias, key in tied.items()})

    persistent = model.state_dict(keep_vars=True)
    own = [t for t in persistent.values() if isinstance(t, torch.Tensor)]
    assign = any(t.is_meta for t in own)
    if (assign and not all(t.is_meta for t in own)) or (
            not assign and any(t.is_meta for t in chain(model.parameters(), model.buffers()))):
        raise ValueError(f"{caller}: the model is partly on the meta device; build it all on meta (its tensors are "
                         "then taken from the file) or all with values (the file's are copied in)")

    names_of: dict[int, list[str]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(fqn)
    recorded = {name for layer in layers for name in layer["names"]}
    layer_prefixes = tuple(f"{name}." for name in recorded)
    if assign:  # non-persistent buffers: in no file, so they would stay on meta, without values
        left = [name for name, t in model.named_buffers(remove_duplicate=False)
                if t.is_meta and name not in persistent and not name.startswith(layer_prefixes)]
        if left:
            raise ValueError(f"{caller}: the model is on the meta device and holds non-persistent buffers, which are "
                             f"in no state_dict and so in no file: {_some(left)}; they would stay on meta, without "
                             "values, and the model's forward would compute garbage. Build the model on the CPU "
                             "(not on meta), or give these buffers their values (on the CPU) before loading")
    for module, names in _sites(model, lambda m: isinstance(m, _PATCHED_TYPES), caller).values():
        stray = [name for name in names if name not in recorded]
        if stray:
            raise ValueError(f"{caller}: the model is already patched: {stray[0]} is a {type(module).__name__}, which "
                             "the file holds dense; load into a freshly built dense model")

    swaps, keys_of_layers = [], set()
    for layer in layers:
        target = _target(model, layer, names_of, caller)
        first, prefixes = layer["names"][0], tuple(f"{name}." for name in layer["names"])
        keys = {key for key in state if key.startswith(prefixes)}
        keys_of_layers |= keys
        misplaced = sorted(key for key in keys if not key.startswith(first + "."))
        if misplaced:
            raise ValueError(f"{caller}: the file holds {misplaced[0]}, under another name of the shared layer {first} "
                             "(its tensors are stored under its first name only)")
        new = _loaded_layer(layer, target, {key[len(first) + 1:]: state[key] for key in keys}, assign, caller)
        swaps.append((layer["names"], target, new))

    rest = {key: t for key, t in state.items() if key not in keys_of_layers}
    expected = {key: t for key, t in persistent.items() if not key.startswith(layer_prefixes)}
    _check_rest(rest, expected, caller)
    _check_ties(expected, tied, caller)

    _swap_all(model, swaps)
    try:
        ties = _ties(model, rest) if assign else []
        result = model.load_state_dict(rest, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if not key.startswith(layer_prefixes)]
        if missing or result.unexpected_keys:  # (checked above: not expected to happen)
            raise ValueError(f"{caller}: load_state_dict reports missing {missing} and unexpected "
                             f"{result.unexpected_keys}")
        _retie(model, ties)
    except BaseException:
        _swap_all(model, [(names, new, old) for names, old, new in swaps])
        raise
    return model


# ---- save ---------------------------------------------------------------------------------------

def _not_storable(t) -> str:
    """Why t cannot go into a safetensors file ('' if it can)."""
    if not isinstance(t, torch.Tensor):
        return f"not a tensor ({type(t).__name__}: a module's extra state)"
    if t.layout != torch.strided:
        return f"a {t.layout} tensor"
    if t.is_meta:
        return "on the meta device (no values to save)"
    return ""


def _unshared(state: dict) -> tuple[dict, dict]:
    """state's tensors each with its own storage, on the CPU and contiguous (what safetensors
    stores), and {alias: key} for the keys that name the very same tensor view as an earlier key
    (tied weights), which are stored once. A tensor sharing storage with another in any other way
    (overlapping or disjoint views) is copied: stored by value, the tie is not kept."""
    first_of_view, tied, kept = {}, {}, {}
    for key, t in state.items():
        if t.numel() == 0:  # no bytes to share (and data pointers of empty tensors say nothing)
            kept[key] = t
            continue
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in first_of_view:
            tied[key] = first_of_view[view]
        else:
            first_of_view[view] = key
            kept[key] = t
    storages: dict = {}
    for key, t in kept.items():
        if t.numel():
            storages.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(key)
    copies = {key for keys in storages.values() if len(keys) > 1 for key in keys}
    out = {}
    for key, t in kept.items():
        t = t.detach()
        t = t.clone() if key in copies else t
        out[key] = t.to("cpu").contiguous()
    return out, tied


def _write(tensors: dict, metadata: dict, path: str) -> None:
    """safetensors' save_file into a temporary file next to path, renamed onto path once complete."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # mkstemp makes the file 0600; the saved file gets the mode the file it replaces had, else that of
        # any new file (0666 less the umask), as open(path, "w") would give it.
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process's umask (read from /proc where it says, else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _version() -> str:
    from . import __version__

    return __version__


# ---- load ---------------------------------------------------------------------------------------

def _read(path: str, caller: str) -> tuple[dict, dict]:
    """The JSON header and the tensors (on the CPU) of a save_compressed file."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{caller}: no file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if _KEY not in metadata:
                raise ValueError(f"{caller}: {path} is a safetensors file without a torchslim header (no "
                                 f"{_KEY!r} metadata): not written by save_compressed; a plain state_dict goes "
                                 "through load_state_dict")
            try:
                header = json.loads(metadata[_KEY])
            except json.JSONDecodeError as e:
                raise ValueError(f"{caller}: {path}: the torchslim header is not valid JSON ({e})") from None
            if not isinstance(header, dict):
                raise ValueError(f"{caller}: {path}: the torchslim header must be a JSON object")
            version = header.get("format_version")
            if version != FORMAT_VERSION:
                raise ValueError(f"{caller}: {path} is a torchslim checkpoint of format version {version!r}; this "
                                 f"torchslim ({_version()}) reads format version {FORMAT_VERSION}")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{caller}: {path} is not a readable safetensors file ({e})") from None
    return header, tensors


def _parse_header(header: dict, stored: dict, path: str, caller: str) -> tuple[list[dict], dict]:
    """The header's layers and tied keys, checked for form (the facts themselves are checked against
    the model and the tensors later)."""
    where = f"{caller}: {path}"
    layers, tied = header.get("layers"), header.get("tied", {})
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise ValueError(f"{where}: the header's 'layers' must be a list of objects")
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        names = layer.get("names")
        if (not isinstance(names, list) or not names
                or not all(isinstance(name, str) and name for name in names)):
            raise ValueError(f"{where}: layer {i} must have 'names', a list of non-empty module names")
        twice = sorted(seen.intersection(names)) or sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{where}: the name {twice[0]} is given to more than one layer")
        seen.update(names)
        cls = layer.get("class")
        if cls not in _CLASSES:
            raise ValueError(f"{where}: layer {names[0]} has class {cls!r}, which this torchslim does not know "
                             f"(known: {', '.join(_CLASSES)})")
        kinds = {"in_features": int, "out_features": int, "bias": bool, "dtype": str}
        wrong = [key for key, kind in kinds.items()
                 if not isinstance(layer.get(key), kind) or (kind is int and isinstance(layer[key], bool))]
        if wrong:
            raise ValueError(f"{where}: layer {names[0]} ({cls}) needs {', '.join(wrong)} "
                             f"({', '.join(kinds[k].__name__ for k in wrong)})")
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise ValueError(f"{where}: the header's 'tied' must map tensor names to tensor names")
    for alias, key in tied.items():
        if key not in stored or alias in stored:
            raise ValueError(f"{where}: 'tied' maps {alias} to {key}, but the file "
                             + (f"stores {alias} itself" if alias in stored else f"has no tensor {key}"))
    return layers, tied


def _facts(layer: dict) -> dict:
    return {key: v for key, v in layer.items() if key not in ("names", "class")}


def _describe(cls: str, facts: dict) -> str:
    return f"{cls}({', '.join(f'{k}={v}' for k, v in facts.items())})"


def _target(model: nn.Module, layer: dict, names_of: dict, caller: str) -> nn.Module:
    """The model's module at the layer's names: one nn.Linear (or a layer of the recorded class) of
    the recorded in/out features, bias and dtype, reachable under exactly those names."""
    names, cls = layer["names"], layer["class"]
    first = names[0]
    modules = []
    for name in names:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError:
            raise ValueError(f"{caller}: the file has a layer {name} ({cls}) but the model has no module of that "
                             "name: is it the same architecture (and config)?") from None
    target = modules[0]
    if type(target) is not nn.Linear and type(target) is not _CLASSES[cls]:
        if isinstance(target, _PATCHED_TYPES):
            raise ValueError(f"{caller}: the model is already patched otherwise: {first} is a {type(target).__name__} "
                             f"where the file has a {cls}; load into a freshly built dense model")
        raise ValueError(f"{caller}: the model's {first} is a {type(target).__name__}, not an nn.Linear (the file "
                         f"holds a {cls} there)")
    if any(m is not target for m in modules[1:]):
        other = next(name for name, m in zip(names, modules) if m is not target)
        raise ValueError(f"{caller}: the file's layer {first} is one module shared under {', '.join(names)}, but in "
                         f"the model {other} is another module")
    extra = [name for name in names_of[id(target)] if name not in names]
    if extra:
        raise ValueError(f"{caller}: the model's {first} is shared, also reachable as {', '.join(extra)}, which the "
                         "file does not list; replacing it at some names only would break the tie")
    if type(target) is nn.Linear:
        have = {"in_features": target.in_features, "out_features": target.out_features,
                "bias": target.bias is not None, "dtype": dtype_name(target.weight.dtype)}
    else:
        have = {key: target._layer_spec()[key] for key in _COMMON}
    want = {key: layer[key] for key in _COMMON}
    if have != want:
        differ = ", ".join(f"{key}={have[key]}" for key in _COMMON if have[key] != want[key])
        hint = (f" (build or convert the model in {want['dtype']}, e.g. model.to(torch.{want['dtype']}))"
                if have["dtype"] != want["dtype"] else "")
        raise ValueError(f"{caller}: the file's layer {first} is {_describe(cls, want)} but the model's "
                         f"{type(target).__name__} there has {differ}{hint}")
    return target


def _loaded_layer(layer: dict, target: nn.Module, tensors: dict, assign: bool, caller: str) -> nn.Module:
    """A new layer of the recorded class, built empty on target's device and loaded with tensors
    (strict), with the recorded facts; not yet in the model."""
    cls, first = _CLASSES[layer["class"]], layer["names"][0]
    device = next(chain(target.parameters(), target.buffers())).device
    # The record's counts (rank, nnz, features) against the stored shapes before anything is allocated
    # from them: a corrupt header must not allocate (or zero-fill) what its numbers say.
    try:
        shapes = cls._spec_shapes(layer)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{caller}: the file's record of layer {first} ({cls.__name__}) cannot build one: "
                         f"{type(e).__name__}: {e}") from None
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise ValueError(f"{caller}: the file's tensors for layer {first} ({cls.__name__}) are refused: it lacks "
                         f"{', '.join(missing)}")
    wrong = [f"{name} of shape {list(tensors[name].shape)} (the record makes {list(shape)})"
             for name, shape in shapes.items() if tuple(tensors[name].shape) != tuple(shape)]
    if wrong:
        raise ValueError(f"{caller}: the file records layer {first} as {_describe(cls.__name__, _facts(layer))}, but "
                         f"its tensors make {'; '.join(wrong)}")
    try:
        new = cls._from_layer_spec(layer, device=device)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{caller}: the file's record of layer {first} ({cls.__name__}) cannot build one: "
                         f"{type(e).__name__}: {e}") from None
    try:
        new.load_state_dict(tensors, strict=True, assign=assign)
    except RuntimeError as e:
        raise ValueError(f"{caller}: the file's tensors for layer {first} ({cls.__name__}) are refused: {e}") from None
    got, want = new._layer_spec(), _facts(layer)
    if got != want:
        raise ValueError(f"{caller}: the file records layer {first} as {_describe(cls.__name__, want)}, but its "
                         f"tensors make {_describe(cls.__name__, got)}")
    return new


def _check_rest(rest: dict, expected: dict, caller: str) -> None:
    """The file's tensors outside the compressed layers against the model's: the same keys, shapes
    and dtypes (strict, before anything is written, so that the load cannot fail half-way)."""
    missing = sorted(set(expected) - set(rest))
    extra = sorted(set(rest) - set(expected))
    problems = []
    if missing:
        problems.append(f"the file lacks tensors the model has: {_some(missing)}")
    if extra:
        problems.append(f"the file has tensors the model lacks: {_some(extra)}")
    for key in sorted(set(rest) & set(expected)):
        t, mine = rest[key], expected[key]
        if not isinstance(mine, torch.Tensor):
            problems.append(f"{key}: the model holds a {type(mine).__name__} (extra state), not a tensor")
        elif t.shape != mine.shape:
            problems.append(f"{key}: shape {list(t.shape)} in the file, {list(mine.shape)} in the model")
        elif t.dtype != mine.dtype:
            problems.append(f"{key}: {dtype_name(t.dtype)} in the file, {dtype_name(mine.dtype)} in the model "
                            "(build or convert the model in the file's dtype)")
    if problems:
        raise ValueError(f"{caller}: the file does not match the model: " + "; ".join(problems[:6])
                         + (f"; and {len(problems) - 6} more" if len(problems) > 6 else ""))


def _tie_groups(tensors: dict) -> list[list[str]]:
    """The keys of tensors that name one tensor (tied): on the meta device the same object, elsewhere
    the same view of the same storage (what save_compressed stores once, under 'tied')."""
    groups: dict = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        ident = (id(t) if t.is_meta else
                 (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype))
        groups.setdefault(ident, []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _check_ties(expected: dict, tied: dict, caller: str) -> None:
    """The model's ties among its tensors outside the compressed layers (expected) against the file's
    (tied: alias -> stored key): a tie on one side only is refused, since loading would either overwrite
    one tensor with the other or give two names one value where the file has two."""
    file_groups: dict[str, list[str]] = {}
    for alias, key in tied.items():
        if alias in expected and key in expected:
            file_groups.setdefault(key, [key]).append(alias)
    model_groups = _tie_groups(expected)
    in_file = {key: i for i, group in enumerate(file_groups.values()) for key in group}
    in_model = {key: i for i, group in enumerate(model_groups) for key in group}
    for group in model_groups:
        if len({in_file.get(key, key) for key in group}) > 1:
            raise ValueError(f"{caller}: the model ties {', '.join(group)} (one tensor under several names), but the "
                             "file stores them as separate tensors (saved from a model without that tie); build the "
                             "model with the same tying (e.g. tie_word_embeddings) as the saved one")
    for group in file_groups.values():
        if len({in_model.get(key, key) for key in group}) > 1:
            raise ValueError(f"{caller}: the file ties {', '.join(group)} (saved from a model where they are one "
                             "tensor), but the model holds them as separate tensors; build the model with the same "
                             "tying (e.g. tie_word_embeddings) as the saved one")


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")


def _ties(model: nn.Module, keys) -> list[tuple[str, list[str]]]:
    """Parameters and buffers the model holds under several of keys: ('_parameters' | '_buffers',
    names); load_state_dict(assign=True) gives each name its own tensor, _retie shares them again."""
    groups = []
    for kind, named in (("_parameters", model.named_parameters), ("_buffers", model.named_buffers)):
        by_id: dict[int, list[str]] = {}
        for name, t in named(remove_duplicate=False):
            if name in keys:
                by_id.setdefault(id(t), []).append(name)
        groups += [(kind, names) for names in by_id.values() if len(names) > 1]
    return groups


def _retie(model: nn.Module, ties) -> None:
    for kind, names in ties:
        first = _owner(model, names[0])
        value = getattr(first[0], kind)[first[1]]
        for name in names[1:]:
            owner, leaf = _owner(model, name)
            getattr(owner, kind)[leaf] = value


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf
