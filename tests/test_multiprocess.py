"""Two JAX processes on localhost (gloo CPU collectives) against one process holding everything.

Runs ``examples/multi_process.py``'s two workers (two CPU devices each, loopback coordinator on a
free port, a timeout on every subprocess, both killed if either fails) and compares the global
masked-mean loss, its gradients over three SGD steps and the vocabulary-parallel
``kl_from_logits(..., axis_name=)`` value and gradient with the same computations in this process.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "_kldiv_example_multi_process", EXAMPLES / "multi_process.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_two_processes_match_one(tmp_path):
    mp = _load_example()
    results = mp.run_workers(str(tmp_path), timeout=90.0)
    assert len(results) == mp.N_PROCESSES
    # each process held two devices of its own
    ids = [set(r["devices"].tolist()) for r in results]
    assert all(len(s) == mp.LOCAL_DEVICES for s in ids) and not ids[0] & ids[1]
    # each process saw half of the vocabulary columns
    assert all(r["vocab_grad_cols"].sum() == mp.V // mp.N_PROCESSES for r in results)

    ref = mp.reference()
    diffs = mp.compare(results, ref)
    assert max(diffs.values()) < 1e-5, diffs
    np.testing.assert_allclose(results[0]["losses"], results[1]["losses"], rtol=0, atol=0)

    # the global mean is not the average of per-device means (the devices keep 12, 2, 6, 2
    # tokens), so agreement above is not an accident of equal counts
    hidden, weight, target, mask, _, _ = mp.problem()
    import kldiv

    values = np.asarray(kldiv.kl_from_logits(target, hidden @ weight))
    per_device = [values[2 * d : 2 * d + 2][mask[2 * d : 2 * d + 2]].mean() for d in range(4)]
    assert abs(np.mean(per_device) - ref["losses"][0]) > 1e-3
