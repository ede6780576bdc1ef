"""Check a student's `init` (a transformers config dict) when the config loads.

Without this, a misspelled key (`hiden_size: 64`) silently trains a model of
transformers' default size, and an invalid combination (3 heads for hidden 64)
fails with a raw traceback only after stage one has run. Here every key is
checked against the model type's config class and the class's own validation
runs, so the error names the key path before any stage starts.

transformers is imported only when a student has `init`, so loading a config
without one stays quick.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from stages.errors import ConfigError, did_you_mean

_FIELD_ERROR = re.compile(r"error for field '([^']+)'")


def check_init(init: dict[str, Any], where: str) -> None:
    """Raise ConfigError naming `<where>.<key>` when `init` is not a valid causal-LM config."""
    from transformers import CONFIG_MAPPING

    params = dict(init)
    model_type = params.pop("model_type", None) or "llama"  # stages/student/model.py's default
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{where}.model_type: {model_type!r} is not a transformers model type"
                        f"{did_you_mean(model_type, list(CONFIG_MAPPING.keys()))}")
    _check_causal_lm(model_type, where)
    config_class = CONFIG_MAPPING[model_type]
    allowed = config_fields(config_class)
    for key in params:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: not a field of {config_class.__name__}"
                            f"{did_you_mean(key, sorted(allowed))}")
    _instantiate(config_class, params, where)


def config_fields(config_class) -> set[str]:
    """Keys the config class takes: its __init__ parameters, its aliases, a default instance's attributes."""
    params = inspect.signature(config_class.__init__).parameters.values()
    names = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    names |= set(getattr(config_class, "attribute_map", {}) or {})
    try:
        names |= {k for k in vars(config_class()) if not k.startswith("_")}
    except Exception:  # noqa: BLE001, S110 - a class without defaults for everything: its signature must do
        pass
    return names


def _check_causal_lm(model_type: str, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    if model_type not in causal:
        raise ConfigError(f"{where}.model_type: {model_type!r} has no causal language model in transformers "
                        f"(students are trained as AutoModelForCausalLM){did_you_mean(model_type, list(causal))}")


def _instantiate(config_class, params: dict, where: str) -> None:
    """Run the config class's own validation; its complaint becomes one line naming the path."""
    try:
        config_class(**params)
    except _validation_errors() as e:
        text = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = re.sub(r"^(ValueError|TypeError): ", "", text[-1] if text else type(e).__name__)
        field = _FIELD_ERROR.search(str(e))
        path = f"{where}.{field.group(1)}" if field else where
        raise ConfigError(f"{path}: invalid {config_class.__name__}: {detail}") from None


def _validation_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError, AttributeError)
    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers 5 config dataclasses
    except ImportError:  # pragma: no cover - older huggingface_hub
        return errors
    return errors + (StrictDataclassError,)


