"""Glade inside the rest of the ecosystem: transformers' Trainer and PEFT adapters."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from architectures import ARCHITECTURES
from glade.tiny import tiny_model

pytestmark = pytest.mark.slow


def test_trainer_lowers_the_loss(tmp_path, tokenizer):
    model = tiny_model()
    text = "the cat sat on the mat. " * 40
    ids = tokenizer(text)["input_ids"]
    blocks = [ids[i : i + 32] for i in range(0, len(ids) - 32, 32)]
    dataset = Dataset.from_dict({"input_ids": blocks})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=30, learning_rate=3e-3,
        logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_lora_with_peft_defaults_trains_saves_reloads_and_merges(tmp_path, architecture):
    options = ARCHITECTURES[architecture]
    model = tiny_model(**options)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))  # no target_modules: Glade's own
    adapted_modules = {name.rsplit(".", 1)[-1] for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    projections = {"c_attn", "c_proj", "c_fc"} | ({"c_gate"} if options.get("activation_function") == "swiglu" else set())
    assert adapted_modules == projections
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (4, 16))
    for _ in range(5):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lora.eval()
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    tiny_model(**options).save_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        assert not torch.allclose(tiny_model(**options)(ids).logits, adapted)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
