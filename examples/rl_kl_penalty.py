"""Policy-gradient fine-tuning with a KL penalty to the reference, the penalty computed four ways.

    python examples/rl_kl_penalty.py               # π_ref: the student saved by lm_distill.py
    python examples/rl_kl_penalty.py --quick       # tiny policy, few steps (tests)

π_ref is the language model saved by ``examples/lm_distill.py`` (``--ref``); when that file does
not exist a tiny one is trained here first. The policy π_θ starts at π_ref and is fine-tuned with
REINFORCE on a reward that needs no data: the fraction of generated tokens that contain a digit
(continuations of short prompts cut from the training text, generation stopping at ``<eos>``).
Per step, B sequences are sampled from π_θ; with advantages A = (R − mean R)/(std R + 10⁻³)
(batch statistics) the loss is

    −mean_t[A · log π_θ(a_t)]  +  β · penalty,

means over the generated tokens kept by the mask (up to and including the first ``<eos>``), the
same β for every penalty:

* ``k1``: ``kldiv.kl_penalty(logp, logp_ref, estimator="k1", reduction="mean", mask=m)``; as a
  loss its gradient has expectation 0, so it does not hold π_θ near π_ref;
* ``k3``: ``estimator="k3"``: unbiased, non-negative value, but its gradient is that of the
  *reverse* KL(π_ref‖π_θ) (the k3-as-loss pitfall);
* ``k3 + k2 grad``: ``estimator="k3", grad_estimator="k2"`` (:func:`kldiv.kl_straight_through`
  inside ``kl_penalty``): value k3, gradient k2's, an unbiased estimate of ∇KL(π_θ‖π_ref);
* ``exact``: the full-vocabulary KL(π_θ‖π_ref) per generated position, from the two models'
  hidden states and output projections with ``kldiv.fused_linear_kl(ref_h, ref_W, h, W,
  direction="reverse", reduction="none", mask=m)`` (reverse: KL(student‖teacher) with the
  policy as the student), reduced with ``kldiv.reduce(..., "mean", mask=m)``;

plus ``none`` (β = 0) for scale. Measured for each: the reward and the exact KL(π_θ‖π_ref) per
generated token reached at the end (on fresh samples, with :func:`kldiv.kl_penalty_exact`); and
the cost of each train step — median wall time after compilation and compiled temporary memory
(``memory_analysis().temp_size_in_bytes``) — including ``exact (logits)``, the exact penalty from
materialised logits with ``kldiv.kl_penalty_exact`` (compiled and timed, not trained; its value
is checked against the fused one).

Outputs (``--out``, default ``examples/figures``): ``rl_kl_penalty.png`` (reward and exact KL
against steps per penalty), ``rl_kl_penalty_cost.png`` (step time and memory per penalty) and
``rl_kl_penalty.json`` (every measured figure). A summary table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from _common import DEFAULT_OUT
from flax import nnx
from lm_distill import (
    DEFAULT_CKPT,
    EOS,
    LM,
    LMConfig,
    ce_loss,
    compile_step,
    load_corpus,
    load_lm,
    make_optimizer,
    make_rows,
    make_step,
    train,
    train_rows_batch,
    train_tokenizer,
)
from tqdm import tqdm

import kldiv

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TRAINED = ("none", "k1", "k3", "k3 + k2 grad", "exact")
MEASURED = (*TRAINED[1:], "exact (logits)")


def tiny_reference(seed: int):
    """A small LM trained here when no saved one exists: V = 512, d = 32, 150 steps."""
    docs = load_corpus(0, 24)
    tok = train_tokenizer(docs, 512)
    cfg = LMConfig(512, 32, 1, 2, 32)
    rows = make_rows(docs, tok, cfg.seq_len)
    graph, params = nnx.split(LM(cfg, rngs=nnx.Rngs(seed)))
    tx = make_optimizer(3e-3, 150)
    step, _ = compile_step(
        make_step(ce_loss(graph), tx), params, tx.init(params), None, *train_rows_batch(rows, 16)
    )
    params, _ = train(
        step,
        params,
        tx.init(params),
        None,
        rows,
        steps=150,
        batch_size=16,
        seed=seed,
        desc="reference LM",
    )
    return nnx.merge(graph, params), cfg, tok


def make_sampler(graph, prompt_len: int, gen_len: int):
    """Ancestral sampling of ``gen_len`` tokens after each prompt (full recompute per token)."""

    @jax.jit
    def sample(params, prompts, key):
        model = nnx.merge(graph, params)
        b = prompts.shape[0]
        tokens = jnp.concatenate([prompts, jnp.zeros((b, gen_len), prompts.dtype)], axis=1)

        def body(i, carry):
            tokens, key = carry
            pos = prompt_len + i - 1  # the position whose logits give token pos + 1
            logits = jax.lax.dynamic_index_in_dim(model(tokens), pos, axis=1, keepdims=False)
            key, sub = jax.random.split(key)
            nxt = jax.random.categorical(sub, logits.astype(jnp.float32)).astype(tokens.dtype)
            return jax.lax.dynamic_update_index_in_dim(tokens, nxt, pos + 1, axis=1), key

        return jax.lax.fori_loop(0, gen_len, body, (tokens, key))[0]

    return sample


def generated_mask(tokens, prompt_len: int, eos: int):
    """Keep-mask over the targets ``tokens[:, 1:]``: generated, up to and including first EOS."""
    targets = tokens[:, 1:]
    gen = jnp.arange(targets.shape[1]) >= prompt_len - 1
    is_eos = (targets == eos) & gen
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS strictly before this target
    return gen & (eos_before == 0)


def token_logp(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def penalty_loss(graph, kind: str, beta: float):
    """REINFORCE loss plus β × the KL penalty computed as ``kind``."""

    def loss_fn(params, ref_params, tokens, mask, adv):
        policy, ref = nnx.merge(graph, params), nnx.merge(graph, ref_params)
        x, y = tokens[:, :-1], tokens[:, 1:]
        h, w = policy.hidden(x), policy.head.kernel[...]
        logits = h @ w
        logp = token_logp(logits, y)
        pg = -kldiv.reduce(adv[:, None] * logp, "mean", mask=mask)
        if kind == "none":
            return pg
        ref_h = jax.lax.stop_gradient(ref.hidden(x))
        ref_w = jax.lax.stop_gradient(ref.head.kernel[...])
        if kind == "exact":
            # KL(π_θ‖π_ref) per position; reverse = KL(student‖teacher), the policy the student
            per_token = kldiv.fused_linear_kl(
                ref_h, ref_w, h, w, reduction="none", mask=mask, direction="reverse"
            )
            kl = kldiv.reduce(per_token, "mean", mask=mask)
        elif kind == "exact (logits)":
            per_token = kldiv.kl_penalty_exact(logits, ref_h @ ref_w, mask=mask)
            kl = kldiv.reduce(per_token, "mean", mask=mask)
        else:
            logp_ref = token_logp(ref_h @ ref_w, y)
            est, grad_est = ("k3", "k2") if kind == "k3 + k2 grad" else (kind, None)
            kl = kldiv.kl_penalty(
                logp, logp_ref, estimator=est, grad_estimator=grad_est, reduction="mean", mask=mask
            )
        return pg + beta * kl

    return loss_fn


def make_rl_step(loss_fn, tx):
    def step(params, opt_state, ref_params, tokens, mask, adv):
        loss, grads = jax.value_and_grad(loss_fn)(params, ref_params, tokens, mask, adv)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny policy, few steps (tests)")
    parser.add_argument("--ref", default=DEFAULT_CKPT, help="π_ref saved by lm_distill.py")
    parser.add_argument(
        "--steps", type=int, default=None, help="RL steps (default 150; 40 with --quick)"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--gen-len", type=int, default=None)
    parser.add_argument("--beta", type=float, default=0.2, help="KL penalty weight")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--out", default=DEFAULT_OUT, help="figure and JSON directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    q = args.quick
    steps = args.steps or (40 if q else 150)
    batch = args.batch_size or 32
    lr = args.lr or (1e-2 if q else 3e-3)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    if os.path.exists(args.ref):
        ref_model, cfg, tok = load_lm(args.ref)
        source = args.ref
    else:
        print(f"no saved reference at {args.ref}; training a tiny one")
        ref_model, cfg, tok = tiny_reference(args.seed)
        source = "trained in-script"
    gen_len = min(args.gen_len or (16 if q else 32), cfg.seq_len - 4)
    prompt_len = min(8, cfg.seq_len - gen_len)
    eos = tok.token_to_id(EOS)
    vocab = tok.get_vocab_size()
    digit = np.array([any(c.isdigit() for c in tok.decode([i])) for i in range(vocab)])
    digit[eos] = False
    print(f"π_ref: {source}, V = {vocab}, d = {cfg.d_model}; {digit.sum()} digit tokens")

    rows = make_rows(load_corpus(0, 24 if q else None), tok, cfg.seq_len)[0]
    prompts_all = rows[:, :prompt_len]
    graph, ref_params = nnx.split(ref_model)
    sample = make_sampler(graph, prompt_len, gen_len)
    digit_j = jnp.asarray(digit)

    @jax.jit
    def rollout_stats(params, ref_params, tokens):
        """Mask, reward per sequence and exact KL(π_θ‖π_ref) per kept token (no gradient)."""
        mask = generated_mask(tokens, prompt_len, eos)
        hit = digit_j[tokens[:, 1:]] & mask
        reward = jnp.sum(hit, 1) / jnp.maximum(jnp.sum(mask, 1), 1)
        x = tokens[:, :-1]
        kl = kldiv.kl_penalty_exact(
            nnx.merge(graph, params)(x), nnx.merge(graph, ref_params)(x), mask=mask
        )
        return mask, reward, kldiv.reduce(kl, "mean", mask=mask)

    def rollout(params, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (batch,), 0, prompts_all.shape[0])
        tokens = sample(params, jnp.asarray(prompts_all)[idx], k2)
        return tokens, *rollout_stats(params, ref_params, tokens)

    tx = optax.adam(lr)
    tokens0, mask0, reward0, _ = rollout(ref_params, jax.random.key(args.seed))
    example = (
        ref_params,
        tx.init(ref_params),
        ref_params,
        tokens0,
        mask0,
        reward0 - reward0.mean(),
    )
    histories, cost, final = {}, {}, {}
    for kind in tqdm(MEASURED + ("none",), desc="penalties"):
        beta = 0.0 if kind == "none" else args.beta
        step, temp = compile_step(make_rl_step(penalty_loss(graph, kind, beta), tx), *example)
        params, opt_state = ref_params, tx.init(ref_params)
        hist = {"reward": [], "kl": [], "step_seconds": []}
        key = jax.random.key(args.seed + 1)  # the same sampling keys for every penalty
        n = steps if kind in TRAINED else 6  # "exact (logits)": timed only
        for i in tqdm(range(n), desc=kind, leave=False, mininterval=0.5):
            tokens, mask, reward, kl = rollout(params, jax.random.fold_in(key, i))
            adv = (reward - jnp.mean(reward)) / (jnp.std(reward) + 1e-3)
            t0 = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, ref_params, tokens, mask, adv)
            jax.block_until_ready(loss)
            hist["step_seconds"].append(time.perf_counter() - t0)
            hist["reward"].append(float(jnp.mean(reward)))
            hist["kl"].append(float(kl))
        cost[kind] = {
            "temp_bytes": temp,
            "step_seconds": float(np.median(hist["step_seconds"][1:])),
        }
        if kind in TRAINED:
            histories[kind] = hist
            # the KL reached: fresh samples from the final policy, 4 batches
            rs, ks = [], []
            for j in range(4):
                _, _, reward, kl = rollout(params, jax.random.fold_in(jax.random.key(999), j))
                rs.append(float(jnp.mean(reward)))
                ks.append(float(kl))
            final[kind] = {"reward": float(np.mean(rs)), "kl": float(np.mean(ks))}

    # the fused exact penalty and the one from logits agree (same batch, same policy)
    x = tokens0[:, :-1]
    ref = nnx.merge(graph, ref_params)
    pol = nnx.merge(graph, jax.tree.map(lambda a: a * 1.05, ref_params))  # a policy ≠ π_ref
    fused = kldiv.fused_linear_kl(
        ref.hidden(x),
        ref.head.kernel[...],
        pol.hidden(x),
        pol.head.kernel[...],
        reduction="none",
        mask=mask0,
        direction="reverse",
    )
    from_logits = kldiv.kl_penalty_exact(pol(x), ref(x), mask=mask0)
    exact_rel_diff = float(jnp.max(jnp.abs(fused - from_logits)) / jnp.max(from_logits))

    seconds = time.perf_counter() - t_start
    metrics = {
        "quick": q,
        "reference": source,
        "vocab": vocab,
        "beta": args.beta,
        "steps": steps,
        "batch_size": batch,
        "gen_len": gen_len,
        "initial_reward": float(jnp.mean(reward0)),
        "final": final,
        "cost": cost,
        "exact_fused_vs_logits_max_rel_diff": exact_rel_diff,
        "seconds": seconds,
    }
    with open(os.path.join(args.out, "rl_kl_penalty.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot(args.out, histories, metrics)
    print_summary(metrics)
    print(f"rl_kl_penalty: {seconds:.1f} s; figures and rl_kl_penalty.json in {args.out}")
    return metrics


COLORS = {
    "none": "tab:gray",
    "k1": "tab:red",
    "k3": "tab:orange",
    "k3 + k2 grad": "tab:green",
    "exact": "tab:blue",
    "exact (logits)": "tab:purple",
}


def _smooth(v, k=5):
    v = np.asarray(v, float)
    return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v


def plot(out, histories, m) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for kind, h in histories.items():
        ax[0].plot(_smooth(h["reward"]), color=COLORS[kind], label=kind)
        ax[1].plot(_smooth(h["kl"]), color=COLORS[kind], label=kind)
    ax[0].set(xlabel="step", ylabel="reward (digit-token fraction)", title="reward (5-step mean)")
    ax[1].set(
        yscale="log",
        xlabel="step",
        ylabel="exact KL(π_θ‖π_ref) per token (nats)",
        title=f"KL to π_ref, penalty weight β = {m['beta']:g}",
    )
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rl_kl_penalty.png"), dpi=110)
    plt.close(fig)

    kinds = list(m["cost"])
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].bar(
        kinds, [1e3 * m["cost"][k]["step_seconds"] for k in kinds], color=[COLORS[k] for k in kinds]
    )
    ax[0].set(ylabel="train step (ms, median)", title=f"V = {m['vocab']}, batch {m['batch_size']}")
    ax[1].bar(
        kinds, [m["cost"][k]["temp_bytes"] / 2**20 for k in kinds], color=[COLORS[k] for k in kinds]
    )
    ax[1].set(ylabel="compiled temporary memory (MiB)", title="train step memory")
    for a in ax:
        a.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rl_kl_penalty_cost.png"), dpi=110)
    plt.close(fig)


def print_summary(m) -> None:
    print(f"\ninitial reward {m['initial_reward']:.3f}; β = {m['beta']:g}")
    print(f"{'penalty':<16}{'reward':>10}{'KL(π_θ‖π_ref)':>16}{'step ms':>10}{'temp MiB':>10}")
    for kind in (*TRAINED, "exact (logits)"):
        f = m["final"].get(kind)
        c = m["cost"][kind]
        r, k = (f"{f['reward']:.3f}", f"{f['kl']:.4f}") if f else ("-", "-")
        print(
            f"{kind:<16}{r:>10}{k:>16}{1e3 * c['step_seconds']:>10.1f}"
            f"{c['temp_bytes'] / 2**20:>10.2f}"
        )


if __name__ == "__main__":
    main()
