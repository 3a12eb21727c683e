"""The command lines of the documentation (README.md, docs/*.md, pretrained/*/README.md and the comments of
configs/*.yml) and of the scripts' own --help (their module docstrings, and their parsers' descriptions and epilogs
written elsewhere) are accepted by the scripts they call: each one is parsed by its script's own parser, in this
process, and stopped there, so that nothing runs. A renamed flag or choice would otherwise leave the docs wrong
without a word.
"""
import argparse
import ast
import importlib
import io
import os
import re
import shlex
from contextlib import redirect_stdout
from pathlib import Path
from typing import NamedTuple
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/*.md", "pretrained/*/README.md", "configs/*.yml")
SCRIPTS = ("*.py", "bench/*.py")  # their module docstrings, --help's text
# <name>, my/<run>/x, "train.py ..." (more flags), N, X.yml, A/scores.csv, $EPOCHS: stand for a value of the reader's
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\b[A-Z]\b|\$\{?\w+")
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
LAUNCHERS = ("python", "python3", "torchrun")
SEPARATORS = ("&&", "||", ";", "|", "&")
# an output redirection, which the shell takes off the command line: "> log.txt", ">>log", "2>&1", "&> all.log"
REDIRECTION = re.compile(r"(\d*|&)>>?")
# a recipe's comment line that is a command, not prose that names one: "# python train.py ...", "# VAR=1 torchrun ..."
COMMAND_COMMENT = re.compile(r"(\w+=\S*\s+)*(\S*/)?(python3?|torchrun)\s")

# Commands that record how a result was obtained in another checkout, not what to type in this one:
# {(doc, command as extracted): why it is kept as it is}.
HISTORY = {}
# Flags of another script named in a command's comment: {(doc, flag): why}.
OTHER_SCRIPTS_FLAGS = {
    ("pretrained/nuclei/README.md", "--scale"): "bench/scale.py's table has a column of predict.py's --scale auto",
}
# The same two for the scripts' docstrings and --help (doc: the script, "X.py --help" for a parser's own text).
# Commands that the shell changes before the script sees them, which this test does not redo: {(doc, command): why}.
DOCSTRING_SHELL = {
    ("bench/quality.py",
     "python bench/quality.py configs/dsb2018_96_*_bcedice.yml configs/dsb2018_96_*_lovasz.yml"):
        "the shell expands each glob to the 96x96 recipes of that loss; checked unexpanded, it names no recipe",
}
DOCSTRING_OTHER_FLAGS = {
    ("val.py", "--test_size"): "the run's split comes from train.py's --test_size",
    ("score.py", "--instances"): "the label images scored are those of predict.py --instances",
}


class Command(NamedTuple):
    doc: str  # the file, relative to the checkout
    line: int  # where the command starts in it
    text: str  # as written, continuation lines joined, its comment left out
    script: str  # e.g. "train.py", "bench/speed.py"
    argv: list
    comment_flags: tuple = ()  # the flags its trailing comment names ("# and --amp fp32"), less its launcher's


def shell_lines(text):
    """(line number, shell text) of a markdown file: the logical lines of its shell code blocks (``\\`` continuations
    joined) and its inline code spans (a span broken over lines joined with spaces)."""
    prose, lines, fence, pending = [], [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            prose.append("")
            continue
        prose.append(line if fence is None else "")
        if fence is None or fence not in SHELL_FENCES:
            continue
        start, joined = pending or (number, "")
        joined += " " + stripped
        pending = (start, joined[:-1]) if joined.endswith("\\") else None
        if pending is None:
            lines.append((start, joined.strip()))
    text = "\n".join(prose)
    lines += [(text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
              for m in re.finditer(r"`([^`]+)`", text)]
    return sorted(lines, key=lambda numbered: numbered[0])


def yaml_comment_lines(text):
    """(line number, shell text) of a recipe's comment lines that are commands (:data:`COMMAND_COMMENT`)."""
    comments = [(number, line.strip()[1:].strip()) for number, line in enumerate(text.splitlines(), 1)
                if line.strip().startswith("#")]
    return [(number, comment) for number, comment in comments if COMMAND_COMMENT.match(comment)]


def expand_braces(token):
    """A shell's brace expansion of one {a,b} group: configs/x_{a,b}.yml -> [configs/x_a.yml, configs/x_b.yml]."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    return [token[:m.start()] + part + token[m.end():] for part in m.group(1).split(",")] if m else [token]


def commands_in(doc, lines):
    """The Commands of our scripts among ``lines`` ((line number, shell text)) of ``doc``: each part of a line chained
    with &&, ;, ||, | or &, launched by python (or torchrun) with a .py file, its trailing # comment and output
    redirections left out, the brackets of an optional part ([--tta]) and a bare ``...`` (more flags) dropped.
    Parts that run no .py file (pip, git, python -m pytest) are not ours."""
    found = []
    for number, line in lines:
        m = re.search(r"(^|\s)#", line)
        line, comment = (line[:m.start()], line[m.end():]) if m else (line, "")
        if not any(os.path.basename(w) in LAUNCHERS for w in line.split()):  # prose, or a command of no script
            continue
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise ValueError(f"{doc}:{number}: {e}: {line}") from None
        parts, part, words = [], [], iter(words + [";"])
        for word in words:
            # "$r;": shlex keeps a separator on the word before it
            ends = word not in SEPARATORS and word.endswith((";", "&"))
            word = word[:-1] if ends else word
            if REDIRECTION.fullmatch(word):  # its target is the next word
                next(words, None)
            elif word in SEPARATORS:
                parts.append(part)
                part = []
            elif not REDIRECTION.match(word):  # else a redirection with its target: ">log", "2>&1"
                part.append(word)
            if ends:
                parts.append(part)
                part = []
        for part in parts:
            launcher = next((i for i, w in enumerate(part) if os.path.basename(w) in LAUNCHERS), None)
            if launcher is None or part[launcher + 1: launcher + 2] == ["-m"]:
                continue
            script = next((i for i in range(launcher + 1, len(part)) if part[i].endswith(".py")), None)
            if script is None:
                continue
            argv = [e for w in part[script + 1:] if w != "..." for e in expand_braces(w.lstrip("[").rstrip("]"))]
            named = () if part is not parts[-1] else tuple(
                f for f in re.findall(r"(?<![\w-])--\w+", comment) if f not in {w.split("=")[0] for w in part[:script]})
            found.append(Command(doc, number, " ".join(part), os.path.normpath(part[script]), argv, named))
    return found


def doc_commands():
    """Every Command of the DOCS."""
    found = []
    for pattern in DOCS:
        for path in sorted(ROOT.glob(pattern)):
            doc, text = str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")
            found += commands_in(doc, yaml_comment_lines(text) if path.suffix == ".yml" else shell_lines(text))
    return found


def docstring_lines(text, first=1):
    """(line number, shell text) of a docstring whose first line is line ``first`` of its file: the logical lines of
    its indented (literal) blocks, a line indented deeper than the line before it, or following a ``\\``, joined to
    it (as preprocess_dsb2018.py's usage wraps), and its inline code spans (``x`` or `x`, joined over lines)."""
    lines, pending, prose = [], None, []
    for number, line in enumerate(text.splitlines(), first):
        indent = len(line) - len(line.lstrip())
        prose.append("" if indent else line)
        if pending and line.strip() and (pending[1].endswith("\\") or indent > pending[2]):
            pending = (pending[0], pending[1].rstrip("\\").rstrip() + " " + line.strip(), pending[2])
            continue
        if pending:
            lines.append(pending[:2])
        pending = (number, line.strip(), indent) if indent and line.strip() else None
    lines += [pending[:2]] if pending else []
    text = "\n".join(prose)
    lines += [(first + text.count("\n", 0, m.start()), " ".join(m.group(2).split()))
              for m in re.finditer(r"(``?)(.+?)\1", text, re.S)]
    return sorted(lines, key=lambda numbered: numbered[0])


def docstring_commands(doc, source):
    """The Commands of the module docstring of ``source`` (the text of the script ``doc``), its lines numbered as in
    the file."""
    tree = ast.parse(source)
    text = ast.get_docstring(tree, clean=False)  # a module's docstring starts at column 0: its lines as in the file
    return commands_in(doc, docstring_lines(text, tree.body[0].lineno)) if text else []


def parser_of(script):
    """The parser that the script's main(argv) first parses with (None for a module with no main)."""
    module = importlib.import_module(Path(script).stem)
    if not hasattr(module, "main"):
        return None

    def stop(parser, args=None, namespace=None):
        raise _Parsed(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop), redirect_stdout(io.StringIO()):
        try:
            module.main([])
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{script}'s main returned without parsing its command line")


def script_commands():
    """Every Command of the SCRIPTS' --help: their module docstrings (which most parsers' descriptions quote) and
    their parsers' descriptions and epilogs not taken from the docstring."""
    found = []
    for pattern in SCRIPTS:
        for path in sorted(ROOT.glob(pattern)):
            doc, source = str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")
            found += docstring_commands(doc, source)
            parser = parser_of(doc)
            docstring = ast.get_docstring(ast.parse(source), clean=False) or ""
            for text in (parser.description, parser.epilog) if parser else ():
                if text and text not in docstring:
                    found += commands_in(f"{doc} --help", docstring_lines(text))
    return found


class _Parsed(Exception):
    """The command line under check parsed; raised instead of returning it, so that main goes no further."""

    def __init__(self, parser):
        super().__init__(parser.prog)
        self.parser = parser


class _Exited(Exception):
    """argparse exiting: ``status`` 2 and a message for a refused command line, 0 after --help."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def stand_ins(parser, argv):
    """``argv`` with each placeholder value of an option (--epochs N, --split <split>) replaced by one that the
    option takes (its first choice, else the placeholder itself when its type takes it, else "1"): a placeholder
    stands for any valid value."""
    argv = list(argv)
    for i in range(1, len(argv)):
        action = parser._option_string_actions.get(argv[i - 1])
        if action is None or action.nargs is not None or not PLACEHOLDER.search(argv[i]):
            continue
        if action.choices:
            argv[i] = str(next(iter(action.choices)))
        elif action.type is not None:
            try:
                action.type(argv[i])
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                argv[i] = "1"
    return argv


def refusal(command, other_flags=()):
    """Why the script of ``command`` refuses its arguments, or the flags its comment names (less ``other_flags``)
    are not its own (one line); None when all is well.

    The script's main(argv) runs up to its first parse of ``argv``, which is stopped there: train.py's pre-parse
    of --config and --resume (parse_known_args) is a parse of the whole command line by the full parser, with
    unknown flags refused here as its later parse_args refuses them. A bare ``python X.py`` of the prose names the
    script, so its required flags are not asked for."""
    path = ROOT / command.script
    if not path.is_file():
        return f"no such script {command.script}"
    module = importlib.import_module(path.stem)  # bench/ is on the path (conftest.py)
    assert Path(module.__file__).resolve() == path, f"{path.stem} imports {module.__file__}, not {path}"
    if not hasattr(module, "main"):
        return f"{command.script} is not a command (it has no main)"
    recipes = [w.split("=")[-1] for w in command.argv if w.endswith(".yml")]  # --config=x.yml too
    missing = [r for r in recipes if not PLACEHOLDER.search(r) and not (ROOT / r).is_file()]
    if missing:
        return f"no such recipe {missing[0]}"
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def parse_once(parser, args=None, namespace=None):
        assert args is not None and list(args) == command.argv, \
            f"{command.script}'s main parsed {args!r} before its command line {command.argv!r}"
        _, extras = parse_known_args(parser, stand_ins(parser, args), namespace)
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        raise _Parsed(parser)

    def exit_(parser, status=0, message=None):
        raise _Exited(status, message)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_once), \
            mock.patch.object(argparse.ArgumentParser, "exit", exit_), redirect_stdout(io.StringIO()):
        try:
            module.main(list(command.argv))
        except _Parsed as parsed:
            unknown = [f for f in command.comment_flags
                       if f not in parsed.parser._option_string_actions and f not in other_flags]
            return f"its comment names {unknown[0]}, not a flag of {command.script}" if unknown else None
        except _Exited as e:
            if e.status == 0 or (not command.argv and "arguments are required" in e.message):
                return None
            return (e.message or f"exit status {e.status}").strip()
    raise AssertionError(f"{command.script}'s main returned without parsing its command line")


def problems(commands, history=None, other_flags=None):
    """'doc:line: command' and why, of each of ``commands`` that is refused, less those of ``history`` ({(doc,
    text): reason}); ``other_flags``: {(doc, flag): reason} for a comment's flag of another script. Also the
    entries of both that no command met any more."""
    history, other_flags = history or {}, other_flags or {}
    found, met = [], set()
    for c in commands:
        if (c.doc, c.text) in history:
            met.add((c.doc, c.text))
            continue
        others = {f for doc, f in other_flags if doc == c.doc}
        met |= {(c.doc, f) for f in others & set(c.comment_flags)}
        why = refusal(c, others)
        if why:
            found.append(f"{c.doc}:{c.line}: {c.text}\n    {why}")
    found += [f"allowed but no longer in the docs: {key}" for key in {**history, **other_flags}.keys() - met]
    return found


# [text](target): a link of Markdown; the target ends at the first space (a title may follow) or ")"
LINK = re.compile(r"\]\(([^)\s]+)")
LINKED = ("README.md", "docs/*.md", "pretrained/*/README.md")


def heading_anchors(text):
    """The anchors GitHub gives the headings of a Markdown ``text`` (not those in code blocks): lower case, the
    punctuation but hyphens and underscores dropped, spaces as hyphens; a repeated one gets -1, -2, ..."""
    anchors, seen, fence = set(), {}, False
    for line in text.splitlines():
        fence ^= line.startswith("```")
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading and not fence:
            anchor = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
            anchors.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
            seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


def dead_links(doc, root=ROOT):
    """The links of ``doc`` (a Markdown file in the checkout ``root``) to a file that is not there, or to a heading
    that its page does not have: 'doc: target (why)' strings, doc relative to ``root``. Web addresses are not
    followed."""
    dead = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        page = (doc.parent / path).resolve() if path else doc
        if not page.exists():
            dead.append(f"{doc.relative_to(root)}: {target} (no such file)")
        elif anchor and page.suffix == ".md" and anchor not in heading_anchors(page.read_text()):
            dead.append(f"{doc.relative_to(root)}: {target} (no such heading)")
    return dead


def test_documented_commands_parse():
    commands = doc_commands()
    assert len(commands) > 150, f"only {len(commands)} commands found in {DOCS}: is the extraction broken?"
    found = problems(commands, HISTORY, OTHER_SCRIPTS_FLAGS)
    assert not found, f"{len(found)} documented commands are refused:\n" + "\n".join(found)


def test_script_docstring_commands_parse():
    commands = script_commands()
    assert len(commands) > 40, f"only {len(commands)} commands found in the docstrings of {SCRIPTS}: is the " \
                               "extraction broken?"
    found = problems(commands, DOCSTRING_SHELL, DOCSTRING_OTHER_FLAGS)
    assert not found, f"{len(found)} commands of the scripts' docstrings are refused:\n" + "\n".join(found)


def test_docstring_extraction_and_a_stale_flag():
    source = '''"""Evaluate a run.

    python val.py --name u96 --split test    # a run trained with --test_size
    python val.py --name u96 --no_tta_at_all \\\\
        --tta
    python preprocess_dsb2018.py [--img_size 96]
                                 [--limit N]

Scored as ``val.py --name <run>`` scores, or with `python
val.py --name u96 --dataset_gone x` in the prose; train.py's --test_size and python's own words are prose.
"""
import sys
'''
    found = docstring_commands("val.py", source)
    assert [(c.line, c.script, c.argv, c.comment_flags) for c in found] == [
        (3, "val.py", ["--name", "u96", "--split", "test"], ("--test_size",)),
        (4, "val.py", ["--name", "u96", "--no_tta_at_all", "--tta"], ()),
        (6, "preprocess_dsb2018.py", ["--img_size", "96", "--limit", "N"], ()),
        (9, "val.py", ["--name", "u96", "--dataset_gone", "x"], ()),
    ]
    assert problems(found, other_flags={("val.py", "--test_size"): "train.py's"}) == [
        "val.py:4: python val.py --name u96 --no_tta_at_all --tta\n    val.py: error: unrecognized arguments: "
        "--no_tta_at_all (see: python val.py --help)",
        "val.py:9: python val.py --name u96 --dataset_gone x\n    val.py: error: unrecognized arguments: "
        "--dataset_gone x (see: python val.py --help)"]
    assert docstring_commands("val.py", "import sys\n") == []
    assert parser_of("export.py").description.startswith("Export models/<name>/model.pth to ONNX")
    assert parser_of("bench/timing.py") is None


def test_extraction_and_a_stale_flag():
    doc = """Intro with `python val.py --name <name> --split test` inline, and a wrapped `python
bench/compare_scores.py A/scores.csv B/scores.csv` one; `python bench/scale.py` names a script.

```bash
python3 -m venv .venv && pip install -r requirements.txt && python train.py --config configs/synthetic_UNet.yml
python train.py --config configs/dsb2018_96_UNet_bcedice.yml --epochs N \\
    --name u96   # a comment: and --amp fp32
torchrun --nproc_per_node=4 train.py ...   # each machine its own --nproc_per_node
  python export.py --name <run> [--prune L]
python -m pytest -q tests/test_docs.py
python val.py --name u96 --no_overlays_at_all
python val.py --name u96   # and --tta_at_all
python val.py --name u96 --split test > val.txt 2>&1 &
for r in a b; do python val.py --name $r --batch_size $B 2>>errors.log; done
```

```python
python_looking = "python train.py --nothing"
```
"""
    found = commands_in("doc.md", shell_lines(doc))
    assert [(c.line, c.script, c.argv, c.comment_flags) for c in found] == [
        (1, "val.py", ["--name", "<name>", "--split", "test"], ()),
        (1, "bench/compare_scores.py", ["A/scores.csv", "B/scores.csv"], ()),
        (2, "bench/scale.py", [], ()),
        (5, "train.py", ["--config", "configs/synthetic_UNet.yml"], ()),
        (6, "train.py", ["--config", "configs/dsb2018_96_UNet_bcedice.yml", "--epochs", "N", "--name", "u96"],
         ("--amp",)),
        (8, "train.py", [], ()),
        (9, "export.py", ["--name", "<run>", "--prune", "L"], ()),
        (11, "val.py", ["--name", "u96", "--no_overlays_at_all"], ()),
        (12, "val.py", ["--name", "u96"], ("--tta_at_all",)),
        (13, "val.py", ["--name", "u96", "--split", "test"], ()),  # the shell's redirections and & are not its own
        (14, "val.py", ["--name", "$r", "--batch_size", "$B"], ()),
    ]
    assert problems(found) == [
        "doc.md:11: python val.py --name u96 --no_overlays_at_all\n    val.py: error: unrecognized arguments: "
        "--no_overlays_at_all (see: python val.py --help)",
        "doc.md:12: python val.py --name u96\n    its comment names --tta_at_all, not a flag of val.py"]
    assert problems(found, {("doc.md", "python val.py --name u96 --no_overlays_at_all"): "history"},
                    {("doc.md", "--tta_at_all"): "another script's"}) == []
    assert problems(found[:1], {("doc.md", "python gone.py"): "history"}) == [
        "allowed but no longer in the docs: ('doc.md', 'python gone.py')"]
    # a recipe's prose that names a command is not one (its apostrophe made shlex fail)
    recipe = "# the seed's recipe: python train.py with these flags\n# python val.py --name u96\nepochs: 3\n"
    assert [(c.line, c.argv) for c in commands_in("r.yml", yaml_comment_lines(recipe))] == [(2, ["--name", "u96"])]


def test_refusals_name_the_problem():
    def refused(script, *argv):
        return refusal(Command("doc.md", 1, "", script, list(argv)))

    assert "invalid choice: 'Unet'" in refused("train.py", "--arch", "Unet")
    assert "expected an integer, got 'ten'" in refused("train.py", "--epochs", "ten")
    assert "expected one argument" in refused("predict.py", "--name", "nuclei", "--input", "x/", "--output")
    assert "unrecognized arguments: --scale_jitter_x" in refused("train.py", "--resume", "run", "--scale_jitter_x",
                                                                 "1")
    assert "the following arguments are required: --name" in refused("bench/scale.py", "--limit", "3")
    assert refused("train.py", "--config", "configs/no_such.yml") == "no such recipe configs/no_such.yml"
    assert refused("train.py", "--config=configs/no_such.yml") == "no such recipe configs/no_such.yml"
    assert refused("train.py", "--config=configs/synthetic_UNet.yml") is None
    assert refused("no_such.py") == "no such script no_such.py"
    assert refused("bench/timing.py") == "bench/timing.py is not a command (it has no main)"
    assert refused("train.py", "--help") is None
    assert refused("bench/speed.py", "--quick", "--device", "cpu") is None


def test_documentation_links_lead_to_a_file_and_heading_that_are_there():
    """A section moved to another page, or renamed, leaves no link of the README or docs/ leading nowhere."""
    docs = [doc for pattern in LINKED for doc in sorted(ROOT.glob(pattern))]
    assert sum(len(LINK.findall(doc.read_text())) for doc in docs) > 100, "is the link extraction broken?"
    dead = [link for doc in docs for link in dead_links(doc)]
    assert not dead, f"{len(dead)} links lead nowhere:\n" + "\n".join(dead)


def test_dead_links_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n## Its `--flag`: second, part\n```\n# not a heading\n```\n")
    readme = tmp_path / "README.md"
    readme.write_text("[ok](docs/a.md#its---flag-second-part) [top](#the-top) [gone](docs/b.md) "
                      "[web](https://example.org/x) [code](docs/a.md#not-a-heading)\n# The top\n")
    assert dead_links(readme, tmp_path) == ["README.md: docs/b.md (no such file)",
                                  "README.md: docs/a.md#not-a-heading (no such heading)"]
