"""The demo that README's first command runs: offline, on the embedded default."""

import json
from pathlib import Path

from lmq.api.cli import main

DEMO = Path(__file__).resolve().parents[2] / "demo"


def test_the_shipped_demo_preset_generates_english(lmq_home, tmp_path):
    output = tmp_path / "out.jsonl"
    code = main(
        ["generate", "--preset", str(DEMO / "stdlib-tiny-llama"), str(DEMO / "prompts.jsonl"),
         "-o", str(output), "--max-new-tokens", "16"]
    )
    assert code == 0
    prompts = [json.loads(line) for line in (DEMO / "prompts.jsonl").read_text().splitlines()]
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [p["custom_id"] for p in prompts]
    for prompt, result in zip(prompts, results):
        assert result["error"] is None and result["output"].startswith(prompt["prompt"])
        continuation = result["output"][len(prompt["prompt"]):].split()
        assert continuation and all(word.strip(".,;:()'").isalpha() for word in continuation)
