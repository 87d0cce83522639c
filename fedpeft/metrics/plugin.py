"""Metric plugins written for fedpeft or for KubeEdge Ianvs, called the right way round.

fedpeft calls every metric as ``metric(*, predictions, references)``. Ianvs calls a metric by
position, ``metric(y_true, y_pred)`` (``core/testcasecontroller/testcase/testcase.py``), whatever
its declaration says: a file declaring ``bleu4_metric(y_pred, y_true, **kwargs)`` (as Ianvs's own
``fedllm-peft`` example does) gets the references as ``y_pred``. :func:`plugin_metric` reads the
declaration instead:

* parameters named for what they take (``y_pred``/``y_true``, ``predictions``/``references``, ...,
  in any order) are passed by name, so a declaration can never swap them;
* two parameters whose names say nothing (``f(a, b)``, ``f(*args)``) get ``(y_true, y_pred)`` by
  position, Ianvs's convention;
* anything else is reported, with the signature expected, when the job is validated.

Predictions and references arrive as lists; a dict (as Ianvs may pass) becomes the list of its
values, references aligned to the predictions' keys when both are dicts with the same keys.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fedpeft.errors import RegistryError

PREDICTION_NAMES = ("predictions", "y_pred", "preds", "pred", "prediction", "hypotheses", "hyps", "outputs")
REFERENCE_NAMES = ("references", "y_true", "refs", "ref", "reference", "targets", "labels", "gold")
EXPECTED = ("fn(y_pred, y_true, **kwargs) or fn(*, predictions, references) (parameters named for what they "
            "take, in any order), or fn(a, b) with names that say nothing, which gets (y_true, y_pred) by "
            "position as Ianvs passes them; it returns a number")
_NAMED_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

Call = Callable[[Callable, list, list], Any]


def where(fn: Any) -> str:
    """``file.py:line`` of ``fn``'s definition, or ``''``."""
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (TypeError, OSError):
        return ""


def _role_params(params: list[inspect.Parameter]) -> tuple[str | None, str | None]:
    """The parameter names that take the predictions and the references, where the names say so."""
    named = [p.name for p in params if p.kind in _NAMED_KINDS]
    pred = next((n for n in named if n.lower() in PREDICTION_NAMES), None)
    ref = next((n for n in named if n.lower() in REFERENCE_NAMES), None)
    return pred, ref


def binding(fn: Callable) -> Call:
    """How to call ``fn`` with predictions and references: ``call(fn, predictions, references)``.

    Raises:
        ValueError: if the signature fits none of the conventions (the reason, not the expected form).
    """
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    required = [p for p in params if p.default is p.empty]
    pred, ref = _role_params(params)
    if pred or ref:
        rest = [p for p in required if p.name not in (pred, ref)]
        if (pred is None or ref is None) and len(rest) == 1 and rest[0].kind in _NAMED_KINDS:
            pred, ref = pred or rest[0].name, ref or rest[0].name  # the other one is the unnamed one
            rest = []
        if pred is None or ref is None:
            raise ValueError(f"it names {'predictions' if pred else 'references'} ({pred or ref}) "
                             f"but no parameter for the {'references' if pred else 'predictions'}")
        if rest:
            raise ValueError(f"it also requires {', '.join(p.name for p in rest)}")
        return lambda f, p, r: f(**{pred: p, ref: r})
    positional = [p for p in params if p.kind in _POSITIONAL]
    if any(p.kind == p.KEYWORD_ONLY for p in required) or len(required) > 2 or (len(positional) < 2 and not varargs):
        raise ValueError(f"its parameters ({', '.join(sig.parameters) or 'none'}) cannot take two lists")
    return lambda f, p, r: f(r, p)  # Ianvs: metric(y_true, y_pred)


def _signature(fn: Any) -> str:
    try:
        return f"{getattr(fn, '__name__', 'fn')}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return getattr(fn, "__name__", "fn") + "(?)"


def _as_list(values: Any, keys: list | None = None) -> list:
    if isinstance(values, dict):
        return [values[k] for k in keys] if keys is not None and set(keys) == set(values) else list(values.values())
    return list(values)


def plugin_metric(obj: Any, name: str) -> Callable[..., float]:
    """Wrap a plugin's metric function as fedpeft's ``metric(*, predictions, references) -> float``.

    Args:
        obj: What the plugin file (or entry point) gave for ``name``.
        name: The registry name (``path/file.py:fn``), for messages.

    Raises:
        RegistryError: if ``obj`` is not a function fedpeft can call; the message gives its place,
            its signature and the signature expected.
    """
    if not callable(obj) or inspect.isclass(obj):
        raise RegistryError(f"metric plugin {name!r} is a {type(obj).__name__}, not a function; expected {EXPECTED}")
    try:
        call = binding(obj)
    except (TypeError, ValueError) as e:
        raise RegistryError(f"metric plugin {name!r}{f' ({where(obj)})' if where(obj) else ''} has the wrong "
                            f"signature {_signature(obj)}: {e}; expected {EXPECTED}") from e

    def metric(*, predictions: Any, references: Any) -> float:
        keys = list(predictions) if isinstance(predictions, dict) else None
        value = call(obj, _as_list(predictions), _as_list(references, keys))
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric plugin {name!r} returned {type(value).__name__} {value!r}; "
                            "a metric returns one number") from None

    for attr in ("per_example", "statistics", "from_statistics"):  # fedpeft's bootstrap shortcuts
        if hasattr(obj, attr):
            setattr(metric, attr, getattr(obj, attr))
    metric.__name__ = getattr(obj, "__name__", "metric")
    metric.__wrapped__ = obj  # type: ignore[attr-defined]
    return metric
