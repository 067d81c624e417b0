"""The Hugging Face integration: EMACallback with transformers.Trainer, save_ema_pretrained, accelerate.

Tiny randomly initialised GPT-2 models (two layers, width 32, tied input and
output embeddings), a few steps on the CPU, nothing downloaded.
"""
import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

from ema_cuda import ModelEMA
from support import assert_bit_identical, one_thread, require_package, state  # noqa: F401 - one_thread is autouse

transformers = require_package("transformers", "4.46")
from ema_cuda.integrations.transformers import EMA_FILENAME, EMACallback, save_ema_pretrained  # noqa: E402

VOCAB = 64
EMA_PARAMS = {"decay": 0.5, "decay_type": "threshold"}  # the threshold schedule depends on the step at every step


def gpt2(seed=0, dtype=None):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    return model if dtype is None else model.to(dtype)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        self.ids = torch.randint(0, VOCAB, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(model, out, callbacks, **overrides):
    options = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
                   save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                   seed=0)
    options.update(overrides)
    args = transformers.TrainingArguments(**options)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(16), eval_dataset=Tokens(8, seed=1),
                                callbacks=callbacks)


class Recorder(transformers.TrainerCallback):
    """Copies of the model's state at the Trainer's hooks, by global step; put before the EMACallback."""

    def __init__(self, ema_cb):
        self.ema_cb = ema_cb
        self.trained, self.evaluated, self.saved, self.ema = {}, {}, {}, {}
        self.optimizer_steps = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.optimizer_steps += 1
        self.trained[state.global_step] = _state(model)

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        self.evaluated.setdefault(state.global_step, _state(model))

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saved[state.global_step] = _state(model)
        self.ema[state.global_step] = _state(self.ema_cb.ema.ema)


def _state(module):
    return {k: v.clone() for k, v in state(module).items()}


def reference_ema(initial, trained, total_steps):
    """A ModelEMA updated by hand with the recorded weights of each step."""
    scratch = gpt2()
    scratch.load_state_dict(initial)
    ema = ModelEMA.from_params(scratch, **EMA_PARAMS)
    for step in sorted(trained):
        scratch.load_state_dict(trained[step])
        ema.update(scratch, step=step, total_steps=total_steps)
    return ema


def test_updates_once_per_optimizer_step_with_the_trainers_step(tmp_path):
    model = gpt2()
    initial = _state(model)
    cb = EMACallback(**EMA_PARAMS)
    rec = Recorder(cb)
    trainer(model, tmp_path, [rec, cb], gradient_accumulation_steps=2, max_steps=3).train()
    assert rec.optimizer_steps == 3 and cb.ema.num_updates == 3
    assert_bit_identical(cb.ema.ema, reference_ema(initial, rec.trained, 3).ema)


@pytest.mark.parametrize("evaluate_with_ema, strategy, steps", [
    (True, "steps", [3, 6]), (True, "epoch", [4, 6]), (False, "steps", [3, 6])])
def test_evaluation_uses_the_ema_when_asked_and_checkpoints_hold_both(tmp_path, evaluate_with_ema, strategy, steps):
    cb = EMACallback(evaluate_with_ema=evaluate_with_ema, **EMA_PARAMS)
    rec = Recorder(cb)
    # 16 samples in batches of 4: the epochs end at steps 4 and 6 (max_steps) and begin their evaluation in
    # on_epoch_end, not on_step_end.
    trainer(gpt2(), tmp_path, [rec, cb], eval_strategy=strategy, eval_steps=3, save_strategy=strategy,
            save_steps=3).train()
    assert sorted(rec.evaluated) == sorted(rec.saved) == steps
    for step in steps:
        expected = rec.ema[step] if evaluate_with_ema else rec.trained[step]
        assert_bit_identical(rec.evaluated[step], expected)
        assert not torch.equal(rec.ema[step]["lm_head.weight"], rec.trained[step]["lm_head.weight"])
        # The swap ends before the checkpoint: it holds the training weights, the EMA file the EMA.
        assert_bit_identical(rec.saved[step], rec.trained[step])
        folder = tmp_path / f"checkpoint-{step}"
        saved_model = load_file(str(folder / "model.safetensors"))
        assert all(torch.equal(saved_model[k], rec.trained[step][k]) for k in saved_model)
        saved_ema = load_file(str(folder / EMA_FILENAME))
        assert_bit_identical(saved_ema, rec.ema[step])


def test_swapped_outside_training_and_copy_to_model_at_end(tmp_path):
    model = gpt2()
    cb = EMACallback(copy_to_model_at_end=True, **EMA_PARAMS)
    t = trainer(model, tmp_path, [cb])
    with pytest.raises(RuntimeError, match="no EMA yet"):
        cb.save_pretrained(tmp_path / "early", model=model)
    t.train()
    assert_bit_identical(model, cb.ema.ema)
    trained = _state(model)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # make the EMA and the model differ again
    with cb.swapped() as m:
        assert m is model and torch.equal(model.lm_head.weight, trained["lm_head.weight"])
        assert t.evaluate()["eval_loss"] > 0
    assert torch.equal(model.lm_head.weight, trained["lm_head.weight"] + 1.0)


def test_resume_restores_the_ema_and_continues_bit_identically(tmp_path):
    full_cb = EMACallback(**EMA_PARAMS)
    full = trainer(gpt2(), tmp_path / "full", [full_cb], save_strategy="steps", save_steps=3)
    full.train()

    # Resumed in another output folder: the checkpoint is found through resume_from.
    resumed_cb = EMACallback(resume_from=tmp_path / "full" / "checkpoint-3", **EMA_PARAMS)
    resumed = trainer(gpt2(seed=1), tmp_path / "resumed", [resumed_cb], save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed_cb.ema.num_updates == full_cb.ema.num_updates == 6
    assert_bit_identical(resumed.model, full.model)
    assert_bit_identical(resumed_cb.ema.state_dict()["ema"], full_cb.ema.state_dict()["ema"])

    # Resumed in its own output folder (resume_from_checkpoint=True): found as output_dir/checkpoint-<step>.
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "again" / "checkpoint-3")
    again_cb = EMACallback(**EMA_PARAMS)
    trainer(gpt2(seed=2), tmp_path / "again", [again_cb]).train(resume_from_checkpoint=True)
    assert_bit_identical(again_cb.ema.state_dict()["ema"], full_cb.ema.state_dict()["ema"])

    # A checkpoint without the EMA's file cannot be resumed silently with a fresh EMA.
    os.remove(tmp_path / "again" / "checkpoint-3" / EMA_FILENAME)
    with pytest.raises(FileNotFoundError, match=EMA_FILENAME):
        trainer(gpt2(), tmp_path / "again", [EMACallback(**EMA_PARAMS)]).train(resume_from_checkpoint=True)
    # Unless the EMA was never to be saved: then it starts anew, with a warning.
    fresh_cb = EMACallback(save_with_checkpoints=False, **EMA_PARAMS)
    with pytest.warns(UserWarning, match="starts anew"):
        trainer(gpt2(), tmp_path / "again", [fresh_cb]).train(resume_from_checkpoint=True)
    assert fresh_cb.ema.num_updates == 3


def test_save_pretrained_exports_the_ema_for_from_pretrained(tmp_path):
    model = gpt2()
    cb = EMACallback(**EMA_PARAMS)
    trainer(model, tmp_path / "run", [cb]).train()
    cb.save_pretrained(tmp_path / "export")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert type(loaded) is type(model)
    assert_bit_identical(loaded, cb.ema.ema)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    assert not torch.equal(model.lm_head.weight, loaded.lm_head.weight)


def test_save_ema_pretrained_writes_the_models_dtype_and_checks_its_arguments(tmp_path):
    model = gpt2(dtype=torch.bfloat16)
    ema = ModelEMA(model, 0.5, transformers_free_schedule(), ema_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    ema.update(model, step=1, total_steps=4)
    save_ema_pretrained(model, ema, tmp_path / "bf16")
    saved = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    expected = {k: v.to(torch.bfloat16) for k, v in ema.state_dict()["ema"].items()}
    assert saved and all(saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], expected[k]) for k in saved)

    with pytest.raises(TypeError, match="has no save_pretrained"):
        save_ema_pretrained(torch.nn.Linear(2, 2), ModelEMA(torch.nn.Linear(2, 2), 0.5, transformers_free_schedule()),
                            tmp_path / "x")
    other = ModelEMA(torch.nn.Linear(2, 2), 0.5, transformers_free_schedule())
    with pytest.raises(ValueError, match="holds no entry for the model's keys"):
        save_ema_pretrained(model, other, tmp_path / "y")
    with pytest.raises(TypeError, match="state_dict"):
        save_ema_pretrained(model, ema, tmp_path / "z", state_dict={})


def transformers_free_schedule():
    from ema_cuda.ema_decay_schedules import ConstantDecay

    return ConstantDecay()


def test_callback_arguments_are_checked_before_training():
    with pytest.raises(ValueError, match="decya"):
        EMACallback(decya=0.9)
    with pytest.raises(TypeError, match="either ema or EMA parameters"):
        EMACallback(ema=ModelEMA(gpt2(), 0.5, transformers_free_schedule()), decay=0.9)
    with pytest.raises(TypeError, match="must be a ModelEMA"):
        EMACallback(ema="ema")


@pytest.fixture
def accelerator_state():
    """Accelerate keeps its state in process-wide singletons: reset them so that later Trainers start clean."""
    accelerate = require_package("accelerate", "1.0")
    from accelerate.state import AcceleratorState, GradientState

    yield accelerate
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_a_model_prepared_by_accelerate(tmp_path, accelerator_state, mixed_precision):
    accelerator = accelerator_state.Accelerator(cpu=True, mixed_precision=mixed_precision)
    model = gpt2()
    initial = _state(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEMA.from_params(prepared, **EMA_PARAMS)
    ids = Tokens(4).ids
    batch = {"input_ids": ids, "labels": ids}
    trained = {}
    for step in (1, 2, 3):
        accelerator.backward(prepared(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        ema.update(prepared, step=step, total_steps=3)
        trained[step] = _state(model)
    assert_bit_identical(ema.ema, reference_ema(initial, trained, 3).ema)

    # Under mixed precision the forward is wrapped in autocast; the EMA's copy runs its own weights.
    with torch.no_grad():
        own = ema.ema(input_ids=batch["input_ids"]).logits
        with ema.swapped(prepared):
            swapped = prepared(input_ids=batch["input_ids"]).logits
        trained_logits = prepared(input_ids=batch["input_ids"]).logits
    assert torch.equal(own, swapped) and not torch.equal(own, trained_logits)

    save_ema_pretrained(prepared, ema, tmp_path / "export")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert_bit_identical(loaded, ema.ema)


def test_on_save_outside_the_trainers_checkpoint_folders_warns(tmp_path):
    # A hyperparameter search writes output_dir/run-<id>/checkpoint-N, a folder callbacks are not told.
    model = gpt2()
    cb = EMACallback(**EMA_PARAMS)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = transformers.TrainerState(global_step=3), transformers.TrainerControl()
    cb.on_train_begin(args, transformers.TrainerState(), control, model=model)
    with pytest.warns(UserWarning, match="checkpoint-3"):
        cb.on_save(args, state, control, model=model)
    assert not any(tmp_path.rglob(EMA_FILENAME))


def test_the_callback_benchmark_runs(monkeypatch):
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # `pytest` without `python -m` does not add the repository root
        monkeypatch.syspath_prepend(root)
    from benchmarks.fw_transformers import BASELINE, run, table

    result = run(layers=1, width=64, rounds=1, block_time=0.001, decay=0.9)
    assert set(result["per_step_s"]) >= {BASELINE, "EMACallback (ema_cuda)"} and "EMACallback" in table(result)
