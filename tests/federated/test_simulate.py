"""The federated simulation end to end on a tiny local BERT text task: one metrics record per round, LoRA-FAIR's
residual below FedAvg's in every round, the final adapter scored again by tools/test.py, DP-DyLoRA's epsilon in
every round and the summary equal to opacus's analysis for its rounds and sampling rate, one DyLoRA rank per round;
and each wrong option as one clear error through tools/federated.py (exit status 2)."""

from __future__ import annotations

import json

import pytest

from vpeft.errors import ConfigError, ExistingPathError
from vpeft.federated import FedConfig, simulate

from ..lm.test_text_tasks import bert_folder, classification_config, label_rows, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    bert = bert_folder(tmp / "bert")
    data = write_jsonl(tmp / "data", {"train": label_rows(48), "val": label_rows(12, 3), "test": label_rows(12, 5)})
    return tmp, bert, data


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_fair_simulation_records_each_round_and_its_adapter_is_a_run(setup, tmp_path, one_thread):
    tmp, bert, data = setup
    cfg = classification_config(tmp_path, f"hf:{bert}", data)
    summary = simulate(cfg, FedConfig(rule="lora_fair", clients=4, beta=0.3, rounds=3, local_steps=3), tmp_path / "out",
                       log=lambda _: None)  # fmt: skip
    records = rows(tmp_path / "out")
    assert [r["round"] for r in records] == [1, 2, 3] and all("accuracy" in r for r in records)
    assert all(r["residual"] < r["residual_fedavg"] for r in records)
    assert sum(summary["client_items"]) == 48 and summary["final"] == records[-1]
    import tools.test as test_tool

    test_tool.main([str(tmp_path / "out"), "--split", "val"])
    again = json.loads((tmp_path / "out" / "test_metrics.json").read_text())
    assert again["accuracy"] == pytest.approx(records[-1]["accuracy"])  # the saved adapter is the last round's


def test_dp_dylora_reports_epsilon_each_round_as_opacus_computes_it(setup, tmp_path, one_thread):
    from opacus.accountants.analysis import rdp as analysis
    from opacus.accountants.rdp import RDPAccountant

    from vpeft.methods.dylora import DyLoRAConfig, draw_rank

    tmp, bert, data = setup
    cfg = classification_config(tmp_path, f"hf:{bert}", data, "method.name=dylora")
    fed = FedConfig(clients=6, clients_per_round=3, rounds=3, local_steps=2, dp_clip=0.3, noise_multiplier=1.2,
                    delta=1e-4)  # fmt: skip
    summary = simulate(cfg, fed, tmp_path / "dp", log=lambda _: None)
    records = rows(tmp_path / "dp")
    orders = RDPAccountant.DEFAULT_ALPHAS
    options = json.loads((tmp_path / "dp" / "adapter" / "adapter_config.json").read_text())["options"]
    for t, r in enumerate(records, 1):
        rdp = analysis.compute_rdp(q=0.5, noise_multiplier=1.2, steps=t, orders=orders)
        assert r["epsilon"] == pytest.approx(analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-4)[0])
        assert (
            r["rank"] == draw_rank(DyLoRAConfig(r=options["r"], seed=options["seed"]), t - 1) and len(r["clients"]) == 3
        )
    assert summary["epsilon"] == records[-1]["epsilon"] and summary["delta"] == 1e-4


def test_mistakes_exit_with_one_clear_error(setup, tmp_path):
    tmp, bert, data = setup
    cfg = classification_config(tmp_path, f"hf:{bert}", data)
    with pytest.raises(ConfigError, match="method.name=ffa_lora"):
        simulate(cfg, FedConfig(rule="ffa_lora", rounds=1, local_steps=1), tmp_path / "a", log=lambda _: None)
    with pytest.raises(ConfigError, match="clients-per-round"):
        FedConfig(clients=2, clients_per_round=3).check()
    with pytest.raises(ConfigError, match="noise multiplier"):
        FedConfig(dp_clip=1.0, noise_multiplier=-1).check()
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExistingPathError):
        simulate(cfg, FedConfig(rounds=1, local_steps=1), tmp_path / "exists", log=lambda _: None)
    import subprocess
    import sys

    config = tmp_path / "text.yaml"
    done = subprocess.run([sys.executable, "tools/federated.py", str(config), "--out", str(tmp_path / "b"), "--rounds",
                           "0"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "--rounds must be at least 1" in done.stderr
