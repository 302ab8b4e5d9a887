"""Every binary command the README and the config docstrings print names a binary and a
config that exist, a variant the config accepts, and override fields the config has: a
renamed field or variant cannot leave a command that stops at its first line."""

import importlib
import pathlib
import re
import shlex

import ml_collections
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"python -m experiments\.(\w+)((?:[^\n\\]|\\\n)*)")


def _commands(text: str) -> list[tuple[str, list[str]]]:
  out = []
  for binary, rest in COMMAND.findall(text):
    rest = rest.replace("\\\n", " ").split("#")[0]
    try:
      out.append((binary, shlex.split(rest)))
    except ValueError:  # an unbalanced quote in prose
      continue
  return out


def _documented() -> list[tuple[str, str, list[str]]]:
  sources = [REPO / "README.md", *sorted((REPO / "configs").rglob("*.py"))]
  return [(str(path.relative_to(REPO)), binary, args) for path in sources
          for binary, args in _commands(path.read_text(encoding="utf-8"))]


DOCUMENTED = _documented()


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False
    node = node[part]
  return True


def test_the_documents_print_many_commands():
  assert len(DOCUMENTED) > 40 and {b for _, b, _ in DOCUMENTED} >= {
      "train_rm", "train_dpo", "train_sft", "train_rl", "best_of_n", "eval_rm", "reproduce"}


@pytest.mark.parametrize("where,binary,args", DOCUMENTED,
                         ids=[f"{w}:{b}:{i}" for i, (w, b, _) in enumerate(DOCUMENTED)])
def test_a_documented_command_names_what_exists(where, binary, args):
  assert (REPO / "experiments" / f"{binary}.py").exists(), f"{where}: no experiments.{binary}"
  configs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
  if not configs:
    return
  path, _, variant = configs[0].partition(":")
  assert (REPO / path).exists(), f"{where}: {path} does not exist"
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  config = module.get_config(variant or None)
  for arg in args:
    if arg.startswith("--config.") and "=" in arg:
      field = arg[len("--config."):].split("=", 1)[0]
      assert _has_field(config, field), f"{where}: {configs[0]} has no field {field!r}"


def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_s_links_to_its_sections_resolve():
  text = (REPO / "README.md").read_text(encoding="utf-8")
  anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
  links = re.findall(r"\]\(#([^)]+)\)", text)
  assert len(links) >= 15
  assert [link for link in links if link not in anchors] == []
