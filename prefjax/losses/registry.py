"""Loss registries: the name a config selects -> the function, and what a trainer must know.

A direct-alignment loss declares its facts where it is registered::

  @register_direct_loss("my_loss", reference_free=True, length_normalized=True)
  def my_loss(x: PairLogps, *, beta, gamma=0.0) -> jax.Array: ...

and trainers read them from its ``DirectLossSpec`` (``direct_loss_spec(name)``);
no code outside this module compares loss names. Paired losses land in
``DIRECT_LOSSES`` (``fn(x, *, beta, **hparams)``), unpaired ones (KTO) in
``UNPAIRED_LOSSES`` (``fn(policy_logps, ref_logps, is_desirable, kl_ref, *, beta,
**hparams)``); ``DIRECT_LOSS_SPECS`` holds the spec of every entry of both.
Reward-model losses register the same way in ``preference.PREFERENCE_LOSSES``.
A loss of either kind may also return ``(losses, {name: value})``: metrics of its own,
logged as ``my_loss/name`` (``split_loss_output``).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, TypeVar

LossFn = Callable[..., Any]
_F = TypeVar("_F", bound=LossFn)

DIRECT_LOSSES: dict[str, LossFn] = {}
UNPAIRED_LOSSES: dict[str, LossFn] = {}


@dataclasses.dataclass(frozen=True)
class DirectLossSpec:
  """A registered direct-alignment loss and the facts a trainer needs about it.

  Attributes:
    name: the registry key (``config.loss``).
    fn: the loss function.
    reference_free: ignores the reference log-probs, so no reference model is
      loaded (``ref.mode=auto`` resolves to ``none``).
    length_normalized: its margin is on token-averaged log-probs, so implicit
      rewards are reported per token.
    soft_label: its ``label_smoothing`` is a soft preference label ε: a pair
      with outcome o trains with ε_o = ε + (1−2ε)(1−o) (a tie gets ½); pairs
      with outcome ≠ 1 are dropped for the other losses.
    unpaired: takes unpaired examples (chosen = desirable, rejected =
      undesirable) and a batch reference point ``kl_ref`` (KTO's signature).
    nll_alpha: default weight α of the chosen-NLL term the trainer adds.
    bradley_terry: the loss is −log σ of the implicit-reward margin, so σ(margin) is
      the preference probability the policy implies, and ``eval_rm`` reports its
      calibration (log-loss, ECE); for other losses only accuracy and ranking.
  """
  name: str
  fn: LossFn
  reference_free: bool = False
  length_normalized: bool = False
  soft_label: bool = False
  unpaired: bool = False
  nll_alpha: float = 0.0
  bradley_terry: bool = False

  @property
  def hyperparameters(self) -> dict[str, Any]:
    """Keyword hyperparameters besides ``beta`` -> their defaults."""
    return keyword_hyperparameters(self.fn, exclude=("beta",))


def keyword_hyperparameters(fn: LossFn, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
  """The keyword-only parameters of ``fn`` (minus ``exclude``) -> their defaults."""
  return {p.name: p.default for p in inspect.signature(fn).parameters.values()
          if p.kind == inspect.Parameter.KEYWORD_ONLY and p.name not in exclude}


DIRECT_LOSS_SPECS: dict[str, DirectLossSpec] = {}


def check_signature(fn: LossFn, kind: str, name: str, inputs: int, keyword: str,
                    form: str) -> None:
  """A loss takes ``inputs`` positional arrays, then ``keyword`` and its hyperparameters
  keyword-only (``form``): a hyperparameter before ``*`` was never passed (trainers give
  them by keyword), and a missing ``keyword`` failed at the first step."""
  params = list(inspect.signature(fn).parameters.values())
  positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD)]
  if len(positional) != inputs:
    raise ValueError(f"{kind} loss {name!r} takes {len(positional)} positional parameter(s) "
                     f"{[p.name for p in positional]}; a {kind} loss is {form}: its "
                     "hyperparameters come after `*` (keyword-only), where trainers pass them")
  if not any(p.name == keyword or p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
    raise ValueError(f"{kind} loss {name!r} lacks the keyword {keyword!r} trainers pass to "
                     f"every {kind} loss: {form}")


def add_to_registry(table: dict[str, Any], name: str, entry: Any, kind: str) -> None:
  """``table[name] = entry``; a second registration of ``name`` is an error."""
  if name in table:
    old = getattr(table[name], "fn", table[name])
    again = (f"; to register it anew (a notebook cell run twice), call prefjax.losses."
             f"registry.unregister_direct_loss({name!r}) first" if kind == "direct" else "")
    raise ValueError(f"{kind} loss {name!r} is already registered "
                     f"({old.__module__}.{old.__name__}){again}")
  table[name] = entry


def lookup(table: dict[str, Any], name: str, kind: str) -> Any:
  """``table[name]``, or a KeyError listing the registered names."""
  try:
    return table[name]
  except KeyError:
    raise KeyError(f"unknown {kind} loss {name!r}; registered: {sorted(table)} (a loss "
                   "registered in your own module: pass --imports=MODULE to the binary)"
                   ) from None


def register_direct_loss(name: str, *, reference_free: bool = False,
                         length_normalized: bool = False, soft_label: bool = False,
                         unpaired: bool = False, nll_alpha: float = 0.0,
                         bradley_terry: bool = False) -> Callable[[_F], _F]:
  """Decorator registering a direct-alignment loss with its facts (see ``DirectLossSpec``)."""
  def decorator(fn: _F) -> _F:
    check_signature(fn, "direct", name, 4 if unpaired else 1, "beta",
                    "fn(policy_logps, ref_logps, is_desirable, kl_ref, *, beta, **hparams)"
                    if unpaired else "fn(x, *, beta, **hparams)")
    spec = DirectLossSpec(name, fn, reference_free=reference_free,
                          length_normalized=length_normalized, soft_label=soft_label,
                          unpaired=unpaired, nll_alpha=float(nll_alpha),
                          bradley_terry=bradley_terry)
    if soft_label and "label_smoothing" not in spec.hyperparameters:
      raise ValueError(f"direct loss {name!r}: soft_label=True needs a keyword "
                       "hyperparameter label_smoothing")
    add_to_registry(DIRECT_LOSS_SPECS, name, spec, "direct")
    (UNPAIRED_LOSSES if unpaired else DIRECT_LOSSES)[name] = fn
    return fn
  return decorator


def split_loss_output(out: Any, kind: str, name: str) -> tuple[Any, dict[str, Any]]:
  """A registered loss returns its per-example losses, or ``(losses, metrics)``.

  ``metrics`` maps names to per-example values (the losses' shape; trainers report their
  weighted mean over the examples the loss counts) or scalars (reported as they are),
  logged as ``<loss name>/<metric>``: a loss's own diagnostics without forking its trainer.
  """
  if not isinstance(out, tuple):
    return out, {}
  if len(out) != 2 or not isinstance(out[1], Mapping):
    raise ValueError(f"{kind} loss {name!r} returned a tuple of {len(out)}; expected the "
                     "per-example losses, or (losses, {metric name: value})")
  losses, metrics = out
  for key, value in metrics.items():
    shape = getattr(value, "shape", ())
    if not isinstance(key, str) or shape not in ((), getattr(losses, "shape", None)):
      raise ValueError(f"{kind} loss {name!r} returned metric {key!r} of shape {shape}; a "
                       f"metric is a scalar or one value per example "
                       f"{getattr(losses, 'shape', None)}, named by a string")
  return losses, {f"{name}/{key}": value for key, value in metrics.items()}


def unregister_direct_loss(name: str) -> None:
  """Removes a registered loss (tests, notebook re-registration)."""
  lookup(DIRECT_LOSS_SPECS, name, "direct")
  spec = DIRECT_LOSS_SPECS.pop(name)
  (UNPAIRED_LOSSES if spec.unpaired else DIRECT_LOSSES).pop(name)


def direct_loss_spec(name: str) -> DirectLossSpec:
  """The spec of the direct or unpaired loss ``name``; a clear error lists the known names."""
  return lookup(DIRECT_LOSS_SPECS, name, "direct")
