"""Run configurations: a YAML file (read with PyYAML's safe loader only) plus command-line flags.

```yaml
model: digits-mlp          # a zoo name, or {factory: "mypkg.models:make_model", checkpoint: w.pt}
                           # zoo: digits-mlp, digits-cnn, or sized by the data: mlp (width,
                           # depth), lenet, resnet18 (vision extra)
data:                      # or just "digits", or {factory: "mypkg.data:make_loader"}
  name: digits             # or gaussian-mixture, mnist, fashion-mnist, cifar10 (torchvision,
                           # from root), fake
  root: null               # the folder of a torchvision data set; never downloaded
  samples_per_class: null  # the first n examples of each class (Papyan's subsets); for
                           # gaussian-mixture the number drawn per class (default 100)
  batch_size: 512
  cache_mb: 2048           # batches kept in memory after the first pass (0: read every pass)
  classes: null            # gaussian-mixture only: C (default 10), the means' pairwise
  separation: null         # distance (default 3.0) and the input dimension (default 64)
  features: null
backend: torchfunc         # or auto
quantities: [hessian, ggn, residual, classmeans, layerwise]
top_k: null                # default 2C
seed: 0
device: cpu
dtype: float64
output: curvkit-out
options:                   # curvkit.Options; a quantity's name holds overrides for it alone
  trace_matvecs: 99
  hessian: {density_steps: 80}
  backend: {pyhessian: {power_tol: 1.0e-7}}
```

Zoo models (``digits-mlp``, ``digits-cnn``) are trained on the data first (``model.epochs``,
default 30). A factory model is built by calling ``package.module:factory()``; its optional
``checkpoint`` is a state dict loaded with ``torch.load(..., weights_only=True)``, so a pickle
that would run code is refused. A data factory returns a re-iterable of (inputs, labels).
"""

from __future__ import annotations

import copy
import importlib
import os
import pickle
import sys
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from curvkit.distributed import Group, shard_loader
from curvkit.errors import InvalidInputError, first_line, listed, shown
from curvkit.report import QUANTITIES

ZOO = ("digits-mlp", "digits-cnn", "mlp", "lenet", "resnet18")
DATASETS = ("digits", "gaussian-mixture", "mnist", "fashion-mnist", "cifar10", "fake")
MIXTURE_KEYS = ("classes", "separation", "features")
ZOO_SETTINGS = ("epochs", "width", "depth")
DTYPES = {"float64": torch.float64, "float32": torch.float32}

DEFAULTS: dict[str, Any] = {
    "model": {
        "name": "digits-mlp",
        "factory": None,
        "checkpoint": None,
        "epochs": 30,
        "width": 64,
        "depth": 2,
    },
    "data": {
        "name": "digits",
        "factory": None,
        "root": None,
        "samples_per_class": None,
        "batch_size": 512,
        "cache_mb": 2048.0,
        "classes": None,
        "separation": None,
        "features": None,
    },
    "backend": "torchfunc",
    "quantities": None,
    "top_k": None,
    "seed": 0,
    "device": "cpu",
    "dtype": "float64",
    "output": "curvkit-out",
    "options": {},
}
TYPES: dict[str, tuple[type, ...]] = {
    "model.name": (str,),
    "model.factory": (str,),
    "model.checkpoint": (str,),
    "model.epochs": (int,),
    "model.width": (int,),
    "model.depth": (int,),
    "data.name": (str,),
    "data.factory": (str,),
    "data.root": (str,),
    "data.samples_per_class": (int,),
    "data.batch_size": (int,),
    "data.cache_mb": (float, int),
    "data.classes": (int,),
    "data.separation": (float, int),
    "data.features": (int,),
    "backend": (str,),
    "quantities": (list,),
    "top_k": (int,),
    "seed": (int,),
    "device": (str,),
    "dtype": (str,),
    "output": (str,),
    "options": (dict,),
}


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> dict:
    """The effective config: defaults, then the file, then ``overrides`` (flags; None = unset)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        _merge(config, _read(Path(path)), where=str(path))
    _merge(config, {k: v for k, v in (overrides or {}).items() if v is not None}, where="flags")
    _check(config)
    return config


class _UniqueKeysLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping (PyYAML keeps the
    last silently: ``top_k: 3`` then ``top_k: 4`` would run with 4 and no word). Merged keys
    (``<<: *defaults``) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {shown(key)} is given twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeysLoader)
    except FileNotFoundError as error:
        raise InvalidInputError(f"config file {path} does not exist.") from error
    except (OSError, UnicodeDecodeError) as error:  # a folder, no permission, not text
        why = getattr(error, "strerror", None) or type(error).__name__
        raise InvalidInputError(f"config file {path} cannot be read ({why}).") from error
    except yaml.YAMLError as error:
        raise InvalidInputError(f"config file {path} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInputError(f"config file {path} must be a mapping of keys to values.")
    return data


def _merge(config: dict[str, Any], given: Mapping[str, Any], where: str) -> None:
    for key, value in given.items():
        if key not in DEFAULTS:
            raise InvalidInputError(
                f"unknown config key {key!r} in {where}; the keys are {', '.join(DEFAULTS)}."
            )
        if key in ("model", "data") and isinstance(value, str):
            value = {"factory": value, "name": None} if ":" in value else {"name": value}
        elif key in ("model", "data") and not isinstance(value, dict):
            raise InvalidInputError(
                f"config key {key!r} in {where} must be a zoo name, a factory "
                f"'package.module:function' or a mapping of its settings, got {shown(value)}."
            )
        if key in ("model", "data") and isinstance(value, dict):
            unknown = sorted(set(value) - set(DEFAULTS[key]), key=str)
            if unknown:
                raise InvalidInputError(
                    f"unknown config key(s) {listed(f'{key}.{str(u)[:40]}' for u in unknown)} in "
                    f"{where}; {key} takes {', '.join(DEFAULTS[key])}."
                )
            if value.get("factory"):
                config[key]["name"] = None
                if key == "model":  # a zoo model's settings: recorded only when given
                    config[key].update(dict.fromkeys(ZOO_SETTINGS))
            config[key].update(value)
        else:
            config[key] = value


def _check(config: dict[str, Any]) -> None:
    for dotted, types in TYPES.items():
        section, _, leaf = dotted.partition(".")
        value = config[section][leaf] if leaf else config[section]
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise InvalidInputError(
                f"config key {dotted!r} must be a {' or '.join(t.__name__ for t in types)}, "
                f"got {value!r}."
            )
    unknown = [q for q in config["quantities"] or [] if q not in QUANTITIES]
    if unknown:  # before the model is trained
        hint = " (separated by spaces, not commas)" if any("," in str(q) for q in unknown) else ""
        raise InvalidInputError(
            f"unknown quantities {shown(unknown)}; choose from {', '.join(QUANTITIES)}{hint}."
        )
    model, data = config["model"], config["data"]
    given = [f"model.{key}" for key in ZOO_SETTINGS if model[key] is not None]
    if model["factory"] is not None and given:
        raise InvalidInputError(
            f"config key(s) {', '.join(given)} apply to zoo models only, not to the factory "
            f"{model['factory']!r}; remove them."
        )
    if model["checkpoint"] is not None:
        model["epochs"] = None  # loaded, not trained: the stored config must not say trained
    if model["factory"] is None and model["name"] not in ZOO:
        raise InvalidInputError(
            f"config key 'model' is {model['name']!r}; use one of {', '.join(ZOO)} or a "
            "factory 'package.module:function'."
        )
    if data["factory"] is None and data["name"] not in DATASETS:
        raise InvalidInputError(
            f"config key 'data' is {data['name']!r}; use one of {', '.join(DATASETS)} or a "
            "factory 'package.module:function'."
        )
    given = [f"data.{key}" for key in MIXTURE_KEYS if data[key] is not None]
    if given and data["name"] != "gaussian-mixture":
        raise InvalidInputError(
            f"config key(s) {', '.join(given)} apply to the gaussian-mixture data set only, "
            f"not to {data['name'] or data['factory']!r}; remove them."
        )
    if not config["output"].strip():
        raise InvalidInputError(
            "config key 'output' is empty; name a folder (e.g. curvkit-out), or '.' for the "
            "working directory."
        )
    if config["dtype"] not in DTYPES:
        raise InvalidInputError(
            f"config key 'dtype' is {config['dtype']!r}; use one of {', '.join(DTYPES)}."
        )
    if config["device"] not in ("cpu", "cuda") and not config["device"].startswith("cuda:"):
        raise InvalidInputError(
            f"config key 'device' is {config['device']!r}; use cpu, cuda or cuda:<index>."
        )
    if config["device"].startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError("config key 'device' asks for CUDA, but no GPU is available.")
    for key in (
        "model.epochs",
        "model.width",
        "model.depth",
        "data.batch_size",
        "data.samples_per_class",
        "data.classes",
        "data.features",
    ):
        section, leaf = key.split(".")
        value = config[section][leaf]
        if value is not None and value < (0 if leaf == "epochs" else 1):
            raise InvalidInputError(f"config key {key!r} must be positive, got {value}.")
    if config["data"]["cache_mb"] < 0:
        raise InvalidInputError(
            f"config key 'data.cache_mb' must be ≥ 0 (0: no cache), got {config['data']['cache_mb']}."
        )


def build(
    config: Mapping[str, Any], progress: bool = True, group: Group = None
) -> tuple[nn.Module, Any]:
    """The model and data a config describes, on its device and in its dtype; with a process
    group, this rank's shard of the data (zoo models are trained on all of it, identically on
    every rank)."""
    from curvkit.datasets import digits_loader, gaussian_mixture_loader, torchvision_loader
    from curvkit.models import digits_cnn, digits_mlp, train, zoo_model

    dtype, device = DTYPES[config["dtype"]], torch.device(config["device"])
    model_cfg, data_cfg, seed = config["model"], config["data"], config["seed"]
    if data_cfg["factory"]:
        data = _call(data_cfg["factory"], "data")
        if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
            raise InvalidInputError(
                f"the data factory {data_cfg['factory']!r} returned a {type(data).__name__}, not "
                "a re-iterable of (inputs, labels) batches such as a DataLoader."
            )
    elif data_cfg["name"] == "digits":
        data = digits_loader(
            batch_size=data_cfg["batch_size"],
            dtype=dtype,
            samples_per_class=data_cfg["samples_per_class"],
        )
    elif data_cfg["name"] == "gaussian-mixture":
        mixture = {
            "num_classes": data_cfg["classes"],
            "separation": data_cfg["separation"],
            "samples_per_class": data_cfg["samples_per_class"],
            "features": data_cfg["features"],
        }
        data = gaussian_mixture_loader(
            data_cfg["batch_size"],
            dtype,
            seed=seed,
            **{key: value for key, value in mixture.items() if value is not None},
        )
    else:
        data = torchvision_loader(
            data_cfg["name"],
            data_cfg["root"],
            data_cfg["batch_size"],
            data_cfg["samples_per_class"],
        )
    if model_cfg["factory"]:
        model = _call(model_cfg["factory"], "model")
        if not isinstance(model, nn.Module):
            raise InvalidInputError(
                f"the model factory {model_cfg['factory']!r} returned a "
                f"{type(model).__name__}, not a torch.nn.Module."
            )
        model = model.to(dtype=dtype)
    elif model_cfg["name"] in ("digits-mlp", "digits-cnn"):
        make = {"digits-mlp": digits_mlp, "digits-cnn": digits_cnn}[model_cfg["name"]]
        model = make(seed=seed, dtype=dtype)
    else:  # sized by the data: one example's shape, and the largest label + 1 classes
        shape = tuple(next(iter(data))[0].shape[1:])
        classes = 1 + max(int(y.max()) for _, y in data)
        width, depth = model_cfg["width"], model_cfg["depth"]
        model = zoo_model(model_cfg["name"], shape, classes, width, depth, seed, dtype)
    if model_cfg["checkpoint"]:
        model.load_state_dict(load_checkpoint(model_cfg["checkpoint"]))
    elif model_cfg["factory"] is None and model_cfg["epochs"]:
        # zoo models are trained first: on shuffled digits, or on the configured data
        training = (
            digits_loader(
                batch_size=64,
                dtype=dtype,
                samples_per_class=data_cfg["samples_per_class"],
                shuffle=True,
                seed=seed,
            )
            if data_cfg["name"] == "digits" and not data_cfg["factory"]
            else data
        )
        train(model, training, model_cfg["epochs"], seed=seed, progress=progress)
    if group is not None:
        data = shard_loader(data, group)
    if device.type != "cpu":
        data = _Moved(data, device)
    return model.to(device), data


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict read with ``weights_only=True``: tensors only, never code from a pickle."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise InvalidInputError(f"checkpoint {path} does not exist.") from error
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise InvalidInputError(
            f"checkpoint {path} is not a plain state dict of tensors (torch.load with "
            "weights_only=True refused it); save it with torch.save(model.state_dict(), path)."
        ) from error
    if not isinstance(state, dict):
        raise InvalidInputError(
            f"checkpoint {path} holds a {type(state).__name__}, not a state dict."
        )
    return state


def _call(spec: str, what: str) -> Any:
    """Import ``package.module:function`` and call it without arguments."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InvalidInputError(
            f"the {what} factory {spec!r} must look like 'package.module:function'."
        )
    # the working folder is searched last, so that a module there (mymodels.py) is found
    # without PYTHONPATH=. but cannot shadow an installed package
    folder = os.getcwd()
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise InvalidInputError(f"cannot import the {what} factory {spec!r}: {error}.") from error
    finally:
        if added:
            sys.path.remove(folder)
    if not callable(factory):
        raise InvalidInputError(
            f"the {what} factory {spec!r} is a {type(factory).__name__}, not a function; name a "
            f"function that returns the {what}."
        )
    try:
        return factory()
    except SystemExit as error:  # e.g. builtins:exit: not a silent exit 0 without a report
        raise InvalidInputError(
            f"the {what} factory {spec!r} exited ({error.code!r}) instead of returning a {what}."
        ) from None
    except Exception as error:
        first = first_line(error)
        raise InvalidInputError(
            f"the {what} factory {spec!r} raised {type(error).__name__}"
            f"{': ' + shown(first)[1:-1] if first else ''}; fix the factory (call it in Python "
            "for the whole traceback)."
        ) from error


class _Moved:
    """A loader whose batches are moved to ``device`` (a re-iterable)."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device), y.to(self.device)


def dump(config: Mapping[str, Any]) -> str:
    """The config as YAML, in the order of the defaults."""
    return yaml.safe_dump(dict(config), sort_keys=False)
