"""Rebuild tests/assets/tiny-tokenizer: a 600-word byte-level BPE trained on the kids_qa questions and answers.

Tests need a real tokenizer (offsets, special tokens, Japanese text) but not a 33 MB one.
It knows the turn markers of every built-in template as special tokens, like real chat tokenizers.
Run: python tests/assets/make_tiny_tokenizer.py
"""

import csv
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>",
           "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

rows = list(csv.DictReader((HERE.parents[1] / "examples/kids_qa/kids_qa.csv").open(encoding="utf-8")))
texts = [r["question"] for r in rows] + [r["answer"] for r in rows] + ["user model assistant system ### User: Assistant:"]
tokenizer = Tokenizer(models.BPE())
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tokenizer.train_from_iterator(texts, trainer)
fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                               unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
fast.save_pretrained(HERE / "tiny-tokenizer")
print(f"saved {len(fast)} tokens to {HERE / 'tiny-tokenizer'}")
