"""Studies with `sample:` and `num_samples:`: validation, seeded draws, Ray Tune's search spaces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_probes.studies.spec import StudyError, load_study
from lightning_probes.studies.trials import draw, expand_trials
from tests.studies.conftest import write_study

SAMPLE = {"model.init_args.lr": {"loguniform": [0.001, 0.1]},
          "model.init_args.momentum": {"uniform": [0.5, 0.9]},
          "data.init_args.batch_size": {"choice": [16, 32]},
          "model.init_args.step_size": {"randint": [1, 4]},
          "data.init_args.train_size": {"lograndint": [100, 1000]}}


def _spec(tmp_path, **fields):
    return load_study(str(write_study(tmp_path / "s.yaml", grid=None, **fields)))


def test_draws_are_seeded_in_range_and_stable_in_num_samples(tmp_path):
    spec = _spec(tmp_path, sample=SAMPLE, num_samples=40, seeds=[3])
    trials = expand_trials(spec)
    assert [t.trial_id for t in trials[:2]] == ["sample=0000-seed=3", "sample=0001-seed=3"]
    for t in trials:
        p = t.params
        assert 0.001 <= p["model.init_args.lr"] < 0.1 and 0.5 <= p["model.init_args.momentum"] < 0.9
        assert p["data.init_args.batch_size"] in (16, 32) and p["model.init_args.step_size"] in (1, 2, 3)
        assert 100 <= p["data.init_args.train_size"] < 1000 and isinstance(p["data.init_args.train_size"], int)
    assert len({t.params["model.init_args.lr"] for t in trials}) == 40
    fewer = expand_trials(_spec(tmp_path, sample=SAMPLE, num_samples=5, seeds=[3]))
    assert [t.params for t in fewer] == [t.params for t in trials[:5]]
    other = expand_trials(_spec(tmp_path, sample=SAMPLE, num_samples=5, seeds=[3], sample_seed=1))
    assert [t.params for t in other] != [t.params for t in fewer]


def test_override_and_drawn_seed(tmp_path):
    path = write_study(tmp_path / "s.yaml", grid=None, seeds=None, num_samples=4,
                       sample={**SAMPLE, "seed": {"randint": [0, 10**6]}})
    spec = load_study(str(path), num_samples=7)
    trials = expand_trials(spec)
    assert len(trials) == 7 and len({t.seed for t in trials}) == 7
    assert all(t.trial_id == f"sample={i:04d}-seed={t.seed}" for i, t in enumerate(trials))
    assert all("seed" not in t.params for t in trials)


def test_loguniform_and_lograndint_are_uniform_in_log():
    from scipy.stats import kstest

    rng = np.random.default_rng(0)
    values = np.log([draw(("loguniform", [1e-4, 1.0]), rng) for _ in range(3000)])
    assert kstest(values, "uniform", args=(math.log(1e-4), -math.log(1e-4))).pvalue > 1e-3
    ints = np.array([draw(("lograndint", [1, 1000]), rng) for _ in range(3000)])
    assert ints.min() >= 1 and ints.max() <= 999 and (ints < 32).mean() == pytest.approx(0.5, abs=0.05)


def test_distributions_are_ray_tune_search_spaces(tmp_path):
    """Each distribution is the Tune search space of its name, and our draws follow Tune's own sampler."""
    tune = pytest.importorskip("ray.tune")
    from scipy.stats import ks_2samp

    from lightning_probes.studies.trials import tune_search_space

    spec = _spec(tmp_path, sample=SAMPLE, num_samples=400)
    space = tune_search_space(spec)
    assert isinstance(space["model.init_args.lr"], tune.search.sample.Float)
    assert isinstance(space["data.init_args.batch_size"], tune.search.sample.Categorical)
    assert isinstance(space["model.init_args.step_size"], tune.search.sample.Integer)
    ours = [t.params for t in expand_trials(spec)]
    for key, domain in space.items():
        theirs = domain.sample(size=400, random_state=np.random.RandomState(0))
        mine = [p[key] for p in ours]
        if key == "data.init_args.batch_size":
            assert set(theirs) == set(mine)
            continue
        assert min(theirs) >= min(SAMPLE[key][next(iter(SAMPLE[key]))])
        assert ks_2samp(np.log(mine), np.log(theirs)).pvalue > 1e-3, key


@pytest.mark.parametrize(("fields", "message"), [
    ({"sample": {"model.init_args.lr": {"normal": [0, 1]}}, "num_samples": 2}, "one distribution"),
    ({"sample": {"model.init_args.lr": {"uniform": [1, 0]}}, "num_samples": 2}, "low < high"),
    ({"sample": {"model.init_args.lr": {"loguniform": [0, 1]}}, "num_samples": 2}, "positive low bound"),
    ({"sample": {"model.init_args.step_size": {"randint": [1, 2.5]}}, "num_samples": 2}, "integer bounds"),
    ({"sample": {"model.init_args.lr": {"uniform": [0.1, 0.2]}}}, "`num_samples` to be a positive integer"),
    ({"sample": {"model.init_args.lr": {"uniform": [0.1, 0.2]}}, "num_samples": 2,
      "grid": {"model.init_args.momentum": [0.5]}}, "either `grid`"),
    ({"sample": {"seed": {"uniform": [0, 9]}}, "num_samples": 2}, "`sample` key `seed`"),
])
def test_bad_sample_gives_one_message(tmp_path, fields, message):
    fields = {"grid": None, **fields}
    with pytest.raises(StudyError, match=message):
        load_study(str(write_study(tmp_path / "s.yaml", **fields)))


def test_sampled_zoo_trials_ran_with_their_draws(tiny_zoo):
    """The tiny zoo: every trial's config holds its drawn values, its model trained on `train_size` samples."""
    import yaml

    trials = sorted((tiny_zoo / "trials").iterdir())
    assert len(trials) == 3
    for trial in trials:
        config = yaml.safe_load((trial / "config.yaml").read_text())
        status = yaml.safe_load((trial / "status.json").read_text())
        assert status["status"] == "finished"
        assert config["seed_everything"] == status["seed"] == int(trial.name.split("seed=")[1])
        assert config["model"]["init_args"]["lr"] == status["params"]["model.init_args.lr"]
        assert config["data"]["init_args"]["train_size"] == status["params"]["data.init_args.train_size"]
    assert (tiny_zoo / "figures" / "sampled.png").is_file()
    assert "lr" in (tiny_zoo / "trials.csv").read_text().splitlines()[0]
