"""Language-model distillation end to end: BPE tokenizer, NNX transformers, fused KL vs logits.

    python examples/lm_distill.py                  # full run (V = 8192)
    python examples/lm_distill.py --vocab 32768    # the fused path's memory at a larger vocabulary
    python examples/lm_distill.py --quick          # tiny models, few steps (tests)

Data, with no download: the English text shipped with Python (``pydoc_data.topics``, the
language reference's topic pages, ~465 KB) and the first ``--source-kb`` KB (default 512; 0
with ``--quick``) of the standard library's ``.py`` files (sorted by path). A byte-level BPE
tokenizer is trained on it with the ``tokenizers`` package (vocabulary V including ``<pad>`` and
``<eos>``). Each document is cut into rows of ``seq_len`` + 1 tokens; a document's last row is
padded with ``<pad>``, and the token mask (next-token target is real, not padding) goes into every
loss, so padded positions count nowhere. Every 10th row is held out for validation. (The
``--quick`` mode uses only the first 24 topic pages.)

Models (full run: V = 8192, rows of 64 tokens, batches of 16 rows; ``--quick``: V = 512, d = 64
and 32, rows of 32): decoder-only pre-LayerNorm transformers in Flax NNX (learned positions, causal
``jax.nn.dot_product_attention``, GELU MLP, untied output projection ``head`` of shape
``[d, V]``). A teacher (default 3 layers, d = 256) is trained on next-token cross-entropy; then
students (default 2 layers, d = 128), all from the same initialisation and seeing the same
batches, are trained with Optax AdamW:

* ``scratch``: next-token cross-entropy on the data only (the baseline);
* ``forward`` / ``reverse`` / ``jsd``: distilled with :func:`kldiv.fused_linear_kl` from the
  teacher's and student's last hidden states and output projections, with ``direction=``
  ``"forward"`` (KL(p_T‖q_S)), ``"reverse"`` (KL(q_S‖p_T)) or ``"jsd"`` (β = 0.5), temperature
  ``--temperature``, ``mask=`` the padding mask, ``reduction="mean"`` (mean over kept tokens) and,
  with ``--hard-weight w``, the hard-label term ``labels=targets, hard_weight=w``. The [tokens, V]
  logits of neither model are ever formed;
* ``forward (logits)``: the same forward-KL loss computed from materialised logits with
  :func:`kldiv.losses.distillation_loss` (same reduction, mask and temperature) — a check that
  the fused loss trains identically, and the baseline of the cost comparison.

Reported: validation perplexity (exp of the mean next-token cross-entropy over kept validation
tokens) of the teacher, the untrained student, the scratch student and each distilled student;
tokens per second (median step time after compilation) of the fused and the materialised forward-
KL train steps; and the compiled temporary memory of both steps
(``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``) at the run's
vocabulary and at a sweep of vocabularies (compiled only, not run). The forward-KL student is
saved (``--ckpt``) for ``examples/rl_kl_penalty.py``.

Outputs (``--out``, default ``examples/figures``): ``lm_distill_loss.png`` (training losses and
validation perplexity against steps), ``lm_distill_perplexity.png`` (validation perplexity per
model), ``lm_distill_memory.png`` (temporary memory against V, and tokens per second),
``lm_distill.json`` (every measured figure). A summary table is printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sysconfig
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from _common import DEFAULT_OUT
from flax import nnx
from tqdm import tqdm

import kldiv
from kldiv.losses import distillation_loss

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_CKPT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "checkpoints", "lm_distill_student.npz"
)
PAD, EOS = "<pad>", "<eos>"
DIRECTIONS = ("forward", "reverse", "jsd")
STUDENTS = ("scratch", *DIRECTIONS, "forward (logits)")


# --- data ----------------------------------------------------------------------------------------


def load_corpus(source_kb: int = 0, max_docs: int | None = None) -> list[str]:
    """pydoc's topic pages (the first ``max_docs``), then ``source_kb`` KB of stdlib sources."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)][:max_docs]
    budget = source_kb * 1024
    if budget > 0:
        stdlib = sysconfig.get_paths()["stdlib"]
        for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
            if budget <= 0:
                break
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()[:budget]
            docs.append(text)
            budget -= len(text.encode())
    return docs


def train_tokenizer(docs: list[str], vocab: int):
    """Byte-level BPE with ``vocab`` entries (ids 0 and 1: ``<pad>``, ``<eos>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def make_rows(docs, tok, seq_len: int):
    """Rows of (inputs, targets, mask) ``[n, seq_len]``; a document's last row is padded."""
    pad, eos = tok.token_to_id(PAD), tok.token_to_id(EOS)
    xs, ys, ms = [], [], []
    for enc in tok.encode_batch(docs):
        ids = [*enc.ids, eos]
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start : start + seq_len + 1]
            n = len(chunk) - 1  # real next-token targets in this row
            chunk = chunk + [pad] * (seq_len + 1 - len(chunk))
            xs.append(chunk[:-1])
            ys.append(chunk[1:])
            ms.append([True] * n + [False] * (seq_len - n))
    return np.asarray(xs, np.int32), np.asarray(ys, np.int32), np.asarray(ms, bool)


def split_rows(rows, every: int = 10):
    """(train, validation): every ``every``-th row is held out."""
    n = rows[0].shape[0]
    val = np.arange(n) % every == every - 1
    return tuple(r[~val] for r in rows), tuple(r[val] for r in rows)


# --- model ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab: int
    d_model: int
    layers: int
    heads: int
    seq_len: int


class Block(nnx.Module):
    """Pre-LayerNorm causal self-attention and a 4× GELU MLP, both residual."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
        att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.reshape(b, t, d))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class LM(nnx.Module):
    """Decoder-only transformer; ``hidden`` gives the inputs of the output projection ``head``."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.embed = nnx.Embed(cfg.vocab, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, d)))
        self.blocks = nnx.List([Block(d, cfg.heads, rngs=rngs) for _ in range(cfg.layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, cfg.vocab, use_bias=False, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """``[B, T]`` token ids → ``[B, T, d]`` final hidden states."""
        x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``[B, T]`` → ``[B, T, V]`` logits."""
        return self.hidden(tokens) @ self.head.kernel[...]


def save_lm(path: str, model: LM, cfg: LMConfig, tok) -> None:
    """Parameters, configuration and tokenizer in one ``.npz``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    np.savez(
        path,
        config=np.asarray(json.dumps(dataclasses.asdict(cfg))),
        tokenizer=np.asarray(tok.to_str()),
        **{f"param_{i}": np.asarray(v) for i, v in enumerate(leaves)},
    )


def load_lm(path: str):
    """Inverse of :func:`save_lm`: ``(model, cfg, tokenizer)``."""
    from tokenizers import Tokenizer

    with np.load(path) as f:
        cfg = LMConfig(**json.loads(str(f["config"])))
        tok = Tokenizer.from_str(str(f["tokenizer"]))
        model = LM(cfg, rngs=nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        leaves, treedef = jax.tree.flatten(state)
        new = [jnp.asarray(f[f"param_{i}"]) for i in range(len(leaves))]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model, cfg, tok


# --- losses and steps ----------------------------------------------------------------------------


def token_ce(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def ce_loss(graph):
    """Next-token cross-entropy, mean over kept tokens (the teacher's and the scratch loss)."""

    def loss_fn(params, _teacher_params, x, y, m):
        logits = nnx.merge(graph, params)(x)
        return kldiv.reduce(token_ce(logits, y), "mean", mask=m)

    return loss_fn


def fused_loss(s_graph, t_graph, *, direction, temperature, hard_weight):
    """Distillation loss from hidden states and output projections: no [tokens, V] logits."""

    def loss_fn(params, teacher_params, x, y, m):
        student, teacher = nnx.merge(s_graph, params), nnx.merge(t_graph, teacher_params)
        hard = {"labels": y, "hard_weight": hard_weight} if hard_weight else {}
        return kldiv.fused_linear_kl(
            teacher.hidden(x),
            teacher.head.kernel[...],
            student.hidden(x),
            student.head.kernel[...],
            reduction="mean",
            mask=m,
            temperature=temperature,
            direction=direction,
            **hard,
        )

    return loss_fn


def logits_loss(s_graph, t_graph, *, direction, temperature, hard_weight):
    """The same loss from materialised logits (``kldiv.losses.distillation_loss``)."""

    def loss_fn(params, teacher_params, x, y, m):
        student, teacher = nnx.merge(s_graph, params), nnx.merge(t_graph, teacher_params)
        s_logits = student(x)
        loss = distillation_loss(
            teacher(x),
            s_logits,
            reduction="mean",
            mask=m,
            temperature=temperature,
            direction=direction,
        )
        if hard_weight:
            loss = loss + hard_weight * kldiv.reduce(token_ce(s_logits, y), "mean", mask=m)
        return loss

    return loss_fn


def make_step(loss_fn, tx):
    def step(params, opt_state, teacher_params, x, y, m):
        loss, grads = jax.value_and_grad(loss_fn)(params, teacher_params, x, y, m)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_optimizer(lr: float, steps: int):
    warmup = max(1, min(100, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.1 * lr)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def compile_step(step, *args):
    """AOT-compiled step and its temporary memory in bytes."""
    compiled = jax.jit(step).lower(*args).compile()
    return compiled, int(compiled.memory_analysis().temp_size_in_bytes)


def make_evaluator(graph, batch_size: int):
    @jax.jit
    def sums(params, x, y, m):
        ce = token_ce(nnx.merge(graph, params)(x), y)
        return jnp.sum(jnp.where(m, ce, 0.0)), jnp.sum(m)

    def perplexity(params, rows) -> float:
        x, y, m = rows
        total, count = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            xb, yb, mb = (a[i : i + batch_size] for a in (x, y, m))
            short = batch_size - xb.shape[0]
            if short:  # pad the last batch with masked rows: one compiled shape
                xb, yb, mb = (np.concatenate([a, np.zeros_like(a[:short])]) for a in (xb, yb, mb))
            s, c = sums(params, xb, yb, mb)
            total, count = total + float(s), count + int(c)
        return math.exp(total / max(count, 1))

    return perplexity


def train(
    step,
    params,
    opt_state,
    teacher_params,
    rows,
    *,
    steps,
    batch_size,
    seed,
    desc,
    evaluate=None,
    eval_every=0,
):
    """Runs ``steps`` steps on random rows (the same sequence for a given seed)."""
    x, y, m = rows
    rng = np.random.default_rng(seed)
    hist = {"loss": [], "step_seconds": [], "eval_step": [], "val_ppl": []}
    bar = tqdm(range(steps), desc=desc, mininterval=0.5, leave=False)
    for i in bar:
        idx = rng.integers(0, x.shape[0], batch_size)
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, teacher_params, x[idx], y[idx], m[idx])
        loss = float(loss)  # waits for the step
        hist["step_seconds"].append(time.perf_counter() - t0)
        hist["loss"].append(loss)
        if evaluate is not None and eval_every and (i % eval_every == 0 or i == steps - 1):
            hist["eval_step"].append(i)
            hist["val_ppl"].append(evaluate(params))
            bar.set_postfix(loss=f"{loss:.3f}", val_ppl=f"{hist['val_ppl'][-1]:.1f}")
    bar.close()
    return params, hist


def tokens_per_second(hist, tokens_per_step: int) -> float:
    times = hist["step_seconds"][1:] or hist["step_seconds"]
    return tokens_per_step / float(np.median(times))


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps (tests)")
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary (default 8192)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--teacher-steps", type=int, default=None)
    parser.add_argument("--student-steps", type=int, default=None)
    parser.add_argument("--source-kb", type=int, default=None, help="stdlib source text (KB)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--hard-weight", type=float, default=0.0, help="hard-label CE weight")
    parser.add_argument("--out", default=DEFAULT_OUT, help="figure and JSON directory")
    parser.add_argument("--ckpt", default=DEFAULT_CKPT, help="where to save the student")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    q = args.quick
    vocab = args.vocab or (512 if q else 8192)
    seq_len = args.seq_len or (32 if q else 64)
    batch = args.batch_size or 16
    teacher_steps = args.teacher_steps or (150 if q else 400)
    student_steps = args.student_steps or (100 if q else 300)
    source_kb = args.source_kb if args.source_kb is not None else (0 if q else 512)
    t_cfg = LMConfig(vocab, 64 if q else 256, 2 if q else 3, 2 if q else 4, seq_len)
    s_cfg = LMConfig(vocab, 32 if q else 128, 1 if q else 2, 2 if q else 4, seq_len)
    sweep = sorted({vocab, 4 * vocab} if q else {2048, 8192, 32768, vocab})
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    # data
    docs = load_corpus(source_kb, 24 if q else None)
    tok = train_tokenizer(docs, vocab)
    train_rows, val_rows = split_rows(make_rows(docs, tok, seq_len))
    n_train_tokens, n_val_tokens = int(train_rows[2].sum()), int(val_rows[2].sum())
    # validation perplexity during training: on at most 64 rows (all rows at the end)
    val_probe = tuple(r[:64] for r in val_rows)
    print(
        f"corpus {sum(len(d) for d in docs) / 1024:.0f} KB in {len(docs)} documents; BPE "
        f"V = {tok.get_vocab_size()}; {n_train_tokens} train / {n_val_tokens} validation tokens "
        f"({train_rows[0].shape[0]} / {val_rows[0].shape[0]} rows of {seq_len})"
    )
    tokens_per_step = batch * seq_len

    # teacher
    teacher = LM(t_cfg, rngs=nnx.Rngs(args.seed))
    t_graph, t_params = nnx.split(teacher)
    t_eval = make_evaluator(t_graph, batch)
    tx = make_optimizer(3e-3 if q else 1e-3, teacher_steps)
    example = (t_params, tx.init(t_params), None, *train_rows_batch(train_rows, batch))
    step, _ = compile_step(make_step(ce_loss(t_graph), tx), *example)
    t_params, t_hist = train(
        step,
        t_params,
        tx.init(t_params),
        None,
        train_rows,
        steps=teacher_steps,
        batch_size=batch,
        seed=args.seed,
        desc="teacher",
        evaluate=lambda p: t_eval(p, val_probe),
        eval_every=max(teacher_steps // (4 if q else 10), 1),
    )
    teacher_ppl = t_eval(t_params, val_rows)
    print(f"teacher validation perplexity {teacher_ppl:.2f}")

    # students: one initialisation, the same batches
    s_graph, s_init = nnx.split(LM(s_cfg, rngs=nnx.Rngs(args.seed + 1)))
    s_eval = make_evaluator(s_graph, batch)
    untrained_ppl = s_eval(s_init, val_rows)
    tx = make_optimizer(3e-3 if q else 2e-3, student_steps)
    opts = dict(temperature=args.temperature, hard_weight=args.hard_weight)
    loss_fns = {
        "scratch": ce_loss(s_graph),
        **{d: fused_loss(s_graph, t_graph, direction=d, **opts) for d in DIRECTIONS},
        "forward (logits)": logits_loss(s_graph, t_graph, direction="forward", **opts),
    }
    example = (s_init, tx.init(s_init), t_params, *train_rows_batch(train_rows, batch))
    s_params, hists, temp_bytes = {}, {}, {}
    for name in tqdm(STUDENTS, desc="students"):
        step, temp_bytes[name] = compile_step(make_step(loss_fns[name], tx), *example)
        s_params[name], hists[name] = train(
            step,
            s_init,
            tx.init(s_init),
            t_params,
            train_rows,
            steps=student_steps,
            batch_size=batch,
            seed=args.seed + 1,
            desc=name,
            evaluate=lambda p: s_eval(p, val_probe),
            eval_every=max(student_steps // (4 if q else 10), 1),
        )
    student_ppl = {name: s_eval(s_params[name], val_rows) for name in STUDENTS}
    save_lm(args.ckpt, nnx.merge(s_graph, s_params["forward"]), s_cfg, tok)

    # memory of the fused and materialised forward-KL steps against the vocabulary (compile only)
    memory = {"vocab": sweep, "fused": [], "logits": []}
    for v in tqdm(sweep, desc="memory sweep", leave=False):
        if v == vocab:
            memory["fused"].append(temp_bytes["forward"])
            memory["logits"].append(temp_bytes["forward (logits)"])
            continue
        sg, sp = nnx.split(
            nnx.eval_shape(lambda v=v: LM(dataclasses.replace(s_cfg, vocab=v), rngs=nnx.Rngs(0)))
        )
        tg, tp = nnx.split(
            nnx.eval_shape(lambda v=v: LM(dataclasses.replace(t_cfg, vocab=v), rngs=nnx.Rngs(0)))
        )
        ex = (sp, jax.eval_shape(tx.init, sp), tp, *train_rows_batch(train_rows, batch))
        for key, factory in (("fused", fused_loss), ("logits", logits_loss)):
            fn = factory(sg, tg, direction="forward", **opts)
            memory[key].append(compile_step(make_step(fn, tx), *ex)[1])

    tps = {
        "fused": tokens_per_second(hists["forward"], tokens_per_step),
        "logits": tokens_per_second(hists["forward (logits)"], tokens_per_step),
    }
    seconds = time.perf_counter() - t_start
    k = max(student_steps // 10, 1)
    fwd, mat = hists["forward"]["loss"], hists["forward (logits)"]["loss"]
    metrics = {
        "quick": q,
        "vocab": tok.get_vocab_size(),
        "seq_len": seq_len,
        "batch_size": batch,
        "teacher": dataclasses.asdict(t_cfg),
        "student": dataclasses.asdict(s_cfg),
        "teacher_steps": teacher_steps,
        "student_steps": student_steps,
        "temperature": args.temperature,
        "hard_weight": args.hard_weight,
        "train_tokens": n_train_tokens,
        "val_tokens": n_val_tokens,
        "val_ppl": {"teacher": teacher_ppl, "untrained student": untrained_ppl, **student_ppl},
        "final_train_loss": {n: float(np.mean(h["loss"][-k:])) for n, h in hists.items()},
        "max_abs_loss_diff_fused_vs_logits": float(np.max(np.abs(np.subtract(fwd, mat)))),
        "tokens_per_second": tps,
        "temp_bytes": {"fused": temp_bytes["forward"], "logits": temp_bytes["forward (logits)"]},
        "temp_bytes_by_student": temp_bytes,
        "memory_sweep": memory,
        "seconds": seconds,
    }
    with open(os.path.join(args.out, "lm_distill.json"), "w") as f:
        json.dump(metrics, f, indent=2)

    plot(args.out, t_hist, hists, metrics)
    print_summary(metrics)
    print(
        f"lm_distill: {seconds:.1f} s; figures and lm_distill.json in {args.out}; student "
        f"saved to {args.ckpt}"
    )
    return metrics


def train_rows_batch(rows, batch: int):
    """One batch of the row arrays (for compiling a step with the right shapes)."""
    return tuple(np.asarray(r[:batch]) for r in rows)


COLORS = {
    "teacher": "k",
    "untrained student": "tab:brown",
    "scratch": "tab:gray",
    "forward": "tab:blue",
    "reverse": "tab:orange",
    "jsd": "tab:green",
    "forward (logits)": "tab:purple",
}


def plot(out: str, t_hist, hists, metrics) -> None:
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
    ax[0].plot(t_hist["loss"], lw=0.6, color="k")
    ax[0].set(xlabel="step", ylabel="next-token cross-entropy (nats)", title="teacher training")
    for name, h in hists.items():
        ls = "--" if name == "forward (logits)" else "-"
        ax[1].plot(h["loss"], lw=0.6, ls=ls, color=COLORS[name], label=name)
        ax[2].plot(
            h["eval_step"], h["val_ppl"], marker="o", ms=2.5, ls=ls, color=COLORS[name], label=name
        )
    ax[1].set(
        yscale="log",
        xlabel="step",
        ylabel="training loss (each its own)",
        title=f"students (T = {metrics['temperature']:g})",
    )
    ax[1].legend(fontsize=8)
    ax[2].axhline(metrics["val_ppl"]["teacher"], color="k", ls=":", lw=0.8, label="teacher")
    ax[2].set(
        yscale="log",
        xlabel="step",
        ylabel="validation perplexity",
        title="students: validation perplexity",
    )
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lm_distill_loss.png"), dpi=110)
    plt.close(fig)

    ppl = metrics["val_ppl"]
    names = [n for n in ppl if n != "untrained student"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = ax.bar(names, [ppl[n] for n in names], color=[COLORS[n] for n in names])
    for b, n in zip(bars, names, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, ppl[n], f"{ppl[n]:.1f}", ha="center", va="bottom")
    ax.set(
        ylabel="validation perplexity",
        title=f"V = {metrics['vocab']}, {metrics['student_steps']} student steps "
        f"(untrained student: {ppl['untrained student']:.0f})",
    )
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lm_distill_perplexity.png"), dpi=110)
    plt.close(fig)

    mem = metrics["memory_sweep"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label, c in (
        ("logits", "materialised logits", "tab:purple"),
        ("fused", "kldiv.fused_linear_kl", "tab:blue"),
    ):
        ax[0].plot(mem["vocab"], np.asarray(mem[key]) / 2**20, "o-", color=c, label=label)
    ax[0].set(
        xscale="log",
        yscale="log",
        xlabel="vocabulary V",
        ylabel="temporary memory (MiB)",
        title=f"compiled train step, {metrics['batch_size']}×{metrics['seq_len']} tokens",
    )
    ax[0].legend()
    tps = metrics["tokens_per_second"]
    ax[1].bar(
        ["materialised logits", "fused"],
        [tps["logits"], tps["fused"]],
        color=["tab:purple", "tab:blue"],
    )
    ax[1].set(ylabel="tokens / s", title=f"forward-KL train step, V = {metrics['vocab']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lm_distill_memory.png"), dpi=110)
    plt.close(fig)


def print_summary(m) -> None:
    print(f"\n{'model':<20}{'validation perplexity':>24}")
    for name, p in m["val_ppl"].items():
        print(f"{name:<20}{p:>24.2f}")
    print(f"\n{'train step (forward KL)':<26}{'tokens/s':>12}{'temp MiB':>12}")
    for key, label in (("fused", "fused_linear_kl"), ("logits", "materialised logits")):
        print(
            f"{label:<26}{m['tokens_per_second'][key]:>12.0f}{m['temp_bytes'][key] / 2**20:>12.2f}"
        )
    mem = m["memory_sweep"]
    print(f"\n{'V':>8}{'fused MiB':>12}{'logits MiB':>12}")
    for v, a, b in zip(mem["vocab"], mem["fused"], mem["logits"], strict=True):
        print(f"{v:>8}{a / 2**20:>12.2f}{b / 2**20:>12.2f}")


if __name__ == "__main__":
    main()
