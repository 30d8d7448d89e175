"""Make the demo preset: a tiny Llama that lmq's own `fit` taught to write like
the Python standard library's docstrings.

The text is read from this Python's standard library when the script runs
(parsed with `ast`, nothing imported), so only the weights are committed.
Steps: train a SentencePiece vocabulary on the docstrings, save a randomly
initialised Llama as the base preset, run `lmq fit` on the docstrings, copy
the result to demo/stdlib-tiny-llama/.

    python demo/make_demo_preset.py            # about 7 minutes on two CPU cores
"""

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def is_prose(text: str) -> bool:
    """A sentence or two of English, not a code example or a reST directive."""
    return (
        40 <= len(text) <= 300
        and text[0].isupper()
        and text.endswith(".")
        and not any(marker in text for marker in (">>>", "::", "{", "}", "|", "@"))
    )


def docstring_paragraphs(limit_chars: int) -> list[str]:
    """Prose paragraphs from the stdlib's docstrings, in a stable order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paragraphs, seen, total = [], set(), 0
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        for node in nodes:
            for block in (ast.get_docstring(node) or "").split("\n\n"):
                text = " ".join(block.split())
                if is_prose(text) and text not in seen:
                    seen.add(text)
                    paragraphs.append(text)
                    total += len(text)
                    if total >= limit_chars:
                        return paragraphs
    return paragraphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(HERE / "stdlib-tiny-llama"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--text-chars", type=int, default=500_000)
    args = parser.parse_args()

    import lmq.core  # noqa: F401  (before keras: it picks the torch backend)

    import keras
    import sentencepiece

    from lmq.plugins.llama import LlamaBackbone, LlamaCausalLM, LlamaCausalLMPreprocessor, LlamaTokenizer

    paragraphs = docstring_paragraphs(args.text_chars)
    random.Random(0).shuffle(paragraphs)
    print(f"{len(paragraphs)} paragraphs, {sum(map(len, paragraphs))} characters", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="lmq-demo-"))
    (work / "text.txt").write_text("\n".join(paragraphs))
    sentencepiece.SentencePieceTrainer.train(
        input=str(work / "text.txt"),
        model_prefix=str(work / "spm"),
        vocab_size=1024,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=-1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    keras.utils.set_random_seed(0)
    tokenizer = LlamaTokenizer(proto=str(work / "spm.model"))
    backbone = LlamaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=4,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=128,
        intermediate_dim=352,
        tie_word_embeddings=True,
    )
    base = work / "base"
    LlamaCausalLM(backbone, LlamaCausalLMPreprocessor(tokenizer, sequence_length=64)).save_to_preset(str(base))

    train = work / "train.jsonl"
    train.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    env = {**os.environ, "LMQ_HOME": str(work / "home")}
    env.pop("LMQ_DATABASE_URL", None)
    env.pop("LMQ_BROKER_URL", None)
    subprocess.run(
        [sys.executable, "-m", "lmq.api.cli", "fit", "--preset", str(base), str(train),
         "--output-preset", "stdlib-tiny-llama", "--epochs", str(args.epochs), "--batch-size", "64",
         "--sequence-length", "64", "--learning-rate", "0.003"],
        env=env, check=True, cwd=HERE.parent,
    )
    output = Path(args.output)
    shutil.rmtree(output, ignore_errors=True)
    shutil.copytree(work / "home" / "presets" / "stdlib-tiny-llama", output)
    shutil.rmtree(work)
    print(f"demo preset written to {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
