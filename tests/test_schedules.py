import math
import random

import pytest

from modeling_efficientsam.training.schedules import DistillationSchedule


def guide_schedule(**overrides):
    # 10 epochs of 10 optimizer steps, the original guide's values (T 4 -> 1 after 5 warm-up epochs,
    # alpha/beta 0.9/0.1 -> 0.5/0.5); one extra step makes the decay span exactly 50 steps.
    kwargs = dict(total_steps=101, steps_per_epoch=10)
    kwargs.update(overrides)
    return DistillationSchedule(**kwargs)


def approx_state(state, temperature, alpha, beta):
    assert state["temperature"] == pytest.approx(temperature)
    assert state["alpha"] == pytest.approx(alpha)
    assert state["beta"] == pytest.approx(beta)


def test_defaults_follow_the_original_guide():
    s = guide_schedule()
    assert (s.max_temperature, s.min_temperature, s.distill_warmup_epochs) == (4.0, 1.0, 5.0)
    assert (s.alpha_start, s.beta_start, s.alpha_end, s.beta_end) == (0.9, 0.1, 0.5, 0.5)
    assert s.warmup_steps == 50


def test_values_at_start_warmup_middle_and_end():
    s = guide_schedule()
    approx_state(s.state_at(0), 4.0, 0.9, 0.1)
    approx_state(s.state_at(49), 4.0, 0.9, 0.1)  # last warm-up step
    approx_state(s.state_at(50), 4.0, 0.9, 0.1)  # decay starts from the start values
    approx_state(s.state_at(51), 4.0 - 3.0 / 50, 0.9 - 0.4 / 50, 0.1 + 0.4 / 50)
    approx_state(s.state_at(75), 2.5, 0.7, 0.3)  # halfway through the decay
    approx_state(s.state_at(100), 1.0, 0.5, 0.5)  # last step (total_steps - 1) reaches the end values
    approx_state(s.state_at(1000), 1.0, 0.5, 0.5)  # past the end: held


def test_cosine_decay_values():
    s = guide_schedule(total_steps=151, decay="cosine")  # decay span 100 steps
    quarter = 0.5 * (1 - math.cos(math.pi * 0.25))
    approx_state(s.state_at(75), 4.0 - 3.0 * quarter, 0.9 - 0.4 * quarter, 0.1 + 0.4 * quarter)
    approx_state(s.state_at(100), 2.5, 0.7, 0.3)
    approx_state(s.state_at(150), 1.0, 0.5, 0.5)
    linear = guide_schedule(total_steps=151)
    assert s.state_at(75)["temperature"] > linear.state_at(75)["temperature"]  # cosine starts slower


def test_fractional_warmup_epochs_convert_to_steps():
    s = guide_schedule(distill_warmup_epochs=2.5, steps_per_epoch=8, total_steps=80)
    assert s.warmup_steps == 20
    assert s.state_at(20)["temperature"] == 4.0
    assert s.state_at(21)["temperature"] < 4.0


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_monotone(decay):
    s = guide_schedule(total_steps=137, steps_per_epoch=7, decay=decay)
    states = [s.state_at(step) for step in range(150)]
    for before, after in zip(states, states[1:]):
        assert after["temperature"] <= before["temperature"]
        assert after["alpha"] <= before["alpha"]
        assert after["beta"] >= before["beta"]
    assert states[0]["temperature"] == 4.0 and states[136]["temperature"] == pytest.approx(1.0)


def test_resume_reproduces_the_schedule_exactly():
    config = dict(total_steps=97, steps_per_epoch=9, distill_warmup_epochs=3, decay="cosine")
    uninterrupted = [DistillationSchedule(**config).state_at(step) for step in range(97)]
    # "resume" at step 40: a new object built from the saved config, queried from the restored step on
    resumed_schedule = DistillationSchedule(**DistillationSchedule(**config).to_dict())
    resumed = [resumed_schedule.state_at(step) for step in range(40, 97)]
    assert resumed == uninterrupted[40:]
    # no hidden state: any query order gives the same answers
    order = list(range(97))
    random.Random(0).shuffle(order)
    assert {step: resumed_schedule.state_at(step) for step in order} == dict(enumerate(uninterrupted))


def test_warmup_longer_than_training_holds_start_values():
    s = guide_schedule(total_steps=30)
    assert all(s.state_at(step)["temperature"] == 4.0 for step in range(30))


@pytest.mark.parametrize(
    "bad",
    [
        dict(total_steps=0),
        dict(steps_per_epoch=0),
        dict(distill_warmup_epochs=-1),
        dict(min_temperature=5.0),
        dict(min_temperature=0.0),
        dict(alpha_end=-0.1),
        dict(decay="step"),
    ],
)
def test_invalid_configuration_is_rejected(bad):
    with pytest.raises(ValueError):
        guide_schedule(**bad)


def test_built_from_the_training_arguments():
    from types import SimpleNamespace

    args = SimpleNamespace(distill_warmup_epochs=2, max_temperature=3.0, min_temperature=1.5, alpha_start=1.0,
                           alpha_end=0.6, beta_start=0.0, beta_end=0.4, distill_decay="cosine")
    s = DistillationSchedule.from_training_arguments(args, total_steps=41, steps_per_epoch=5)
    assert s == DistillationSchedule(total_steps=41, steps_per_epoch=5, distill_warmup_epochs=2, max_temperature=3.0,
                                     min_temperature=1.5, alpha_start=1.0, alpha_end=0.6, beta_start=0.0, beta_end=0.4,
                                     decay="cosine")
    approx_state(s.state_at(10), 3.0, 1.0, 0.0)
    approx_state(s.state_at(25), 2.25, 0.8, 0.2)  # halfway along the 30-step cosine decay
    approx_state(s.state_at(40), 1.5, 0.6, 0.4)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError):
        guide_schedule().state_at(-1)
