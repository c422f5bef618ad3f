"""Does fewtune's forgetting figure move the way an independent measurement does? Checked on a finished run.

    python benchmarks/forgetting_direction.py [RUN_DIR]

Independent general text, from sources neither the shipped probe nor replay uses: the prose of scikit-learn's
dataset descriptions (`sklearn/datasets/descr/*.rst`, written by people, installed with scikit-learn; tables, lists
and references left out) and the hand-written passages of `tests/test_forgetting.py`. Its perplexity under the base
model and under the run's adapter gives the independent relative change, printed beside fewtune's own forgetting
signals from the run's `eval_results.json`. Same direction = fewtune's figure is honest about which way general
ability moved.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sklearn_prose(min_words: int = 25) -> list[str]:
    """Paragraphs of running text from scikit-learn's dataset descriptions."""
    import sklearn

    paragraphs = []
    for path in sorted((Path(sklearn.__file__).parent / "datasets" / "descr").glob("*.rst")):
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            lines = [ln.strip() for ln in block.splitlines()]
            if any(ln.startswith((":", "..", "=", "-", "*", "|", "+")) or re.match(r"^\d+\.", ln) for ln in lines):
                continue
            text = " ".join(lines)
            if len(text.split()) >= min_words and "http" not in text and "`" not in text:
                paragraphs.append(text)
    return paragraphs


def test_passages() -> list[str]:
    tree = ast.parse((REPO / "tests" / "test_forgetting.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "INDEPENDENT":
            return list(ast.literal_eval(node.value))
    return []


def main() -> int:
    from tasks.common.generation import load_tuned
    from tasks.common.measure import paired_delta
    from tasks.common.models import load_base, resolve_base_model
    from tasks.config import load_config
    from tasks.evaluate.forgetting import ppl_of, prose_encoding

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a run folder (default: the newest runs/demo-*)")
    args = parser.parse_args()
    runs = sorted((REPO / "runs").glob("demo-*"), key=lambda p: p.stat().st_mtime)
    run_dir = Path(args.run_dir) if args.run_dir else (runs[-1] if runs else None)
    if run_dir is None or not (run_dir / "eval_results.json").is_file():
        print("no run folder with eval_results.json: run `fewtune run` first or pass RUN_DIR", file=sys.stderr)
        return 2
    cfg = load_config(str(run_dir / "config.yaml"))
    adapter = str(run_dir / "adapter")  # the run folder's copy of the adapter
    evaluation = json.loads((run_dir / "eval_results.json").read_text())
    base = resolve_base_model(cfg.model.base).path

    corpora = {"scikit-learn dataset descriptions": sklearn_prose(), "tests/test_forgetting.py passages": test_passages()}
    model, tokenizer = load_base(base, cfg.model.dtype)
    encoded = {name: [prose_encoding(tokenizer, t, 256) for t in texts] for name, texts in corpora.items()}
    base_ppl = {name: ppl_of(model, tokenizer, enc, cfg, f"base: {name}") for name, enc in encoded.items()}
    model = load_tuned(model, adapter)
    tuned_ppl = {name: ppl_of(model, tokenizer, enc, cfg, f"tuned: {name}") for name, enc in encoded.items()}

    print(f"run: {run_dir}")
    print("independent general text (perplexity base -> tuned, relative change, paired interval over passages):")
    for name in corpora:
        rise = paired_delta(base_ppl[name], tuned_ppl[name], cfg, relative=True)
        print(f"  {name:40s} {len(corpora[name]):3d} passages  {base_ppl[name].value:8.3f} -> {tuned_ppl[name].value:8.3f}"
              f"  {rise.value:+.1%}  [{rise.low:+.1%}, {rise.high:+.1%}]")
    print("fewtune's forgetting signals (value, interval):")
    for name, s in (evaluation.get("forgetting") or {}).get("signals", {}).items():
        print(f"  {name:40s} {s['value']:+.4f}  [{s['low']:+.4f}, {s['high']:+.4f}]  n={s['n']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
