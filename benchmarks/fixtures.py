"""Tiny random models and random adapters, for the benchmarks' `--smoke` runs and the tests.

Everything here is built from a config in a second or two, with no downloads: models in
memory (`tiny_bert`, `tiny_gpt2`, `tiny_llama`), model folders with a tokenizer
(`tiny_bert_dir`, `tiny_llama_dir`), and adapters with large random tensors.
It ships in the package, so an installed wheel runs every `--smoke` without `tests/`.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from adapters.config import DCFTConfig
from adapters.injection import dcft_layers, default_head_modules, inject_adapter
from adapters.store.loading import adapter_config_for, save_adapter
from backbones.loading import backbone_ref, load_backbone

CORPUS = [
    "a gripping and funny film with a great cast",
    "dull, overlong and badly written; the plot goes nowhere",
    "the acting is superb but the script is thin",
    "one of the best movies of the year",
    "i walked out before the end, it was that boring",
] * 4


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


TINY_MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences (a second, no downloads)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama_dir(path: Path, context: int = 128) -> Path:
    """A random 2-layer Llama of `context` positions, with the tiny tokenizer."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_wordpiece_tokenizer(model_max_length: int = 128) -> BertTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer trained on a few sentences (a second, no downloads).

    Every printable ASCII character is in the vocabulary, letters and digits also as `##` pieces,
    so ordinary English text never becomes [UNK]; [CLS] $A [SEP] (and $B [SEP]:1) as BERT's.
    The `##` pieces go in with the special tokens: given ids up front, they make the trainer deterministic
    (otherwise it numbers them in hash order, and merges of equal counts come out differently each run)."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [f"##{char}" for char in string.ascii_lowercase + string.digits]
    alphabet = sorted(set(string.printable) - set(string.whitespace))

    def bert_style(model: models.WordPiece) -> Tokenizer:
        tok = Tokenizer(model)
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return tok

    scratch = bert_style(models.WordPiece(unk_token="[UNK]"))
    scratch.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special + pieces,
                                                                  initial_alphabet=alphabet))
    vocab = scratch.get_vocab()
    tok = bert_style(models.WordPiece(vocab, unk_token="[UNK]"))  # only the five special tokens are special here
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)


def tiny_bert_dir(path: Path, context: int = 128) -> Path:
    """A tiny random BERT beside the tiny WordPiece tokenizer: self-contained, no shipped package needed.

    Its small vocabulary splits words into many pieces: a real review takes up to ~175 tokens, so
    runs on real reviews need context=512 (MiniLM's own)."""
    torch.manual_seed(0)
    tokenizer = tiny_wordpiece_tokenizer(model_max_length=context)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=context, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The real backbones' shapes, for throughput with random weights: a GPU machine may hold none of the
# shipped weights, and speed depends on the shapes alone. llama-1b is Llama-3.2-1B's shape.
REAL_SHAPES = {
    "minilm": (BertModel, dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536, max_position_embeddings=512)),
    "smollm2": (LlamaForCausalLM, dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                       tie_word_embeddings=True)),
    "llama-1b": (LlamaForCausalLM, dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                        max_position_embeddings=2048, tie_word_embeddings=True)),
}


def random_model_dir(shape: str, path: Path, device: torch.device | str = "cpu") -> Path:
    """A model folder with one of REAL_SHAPES and random bf16 weights, beside the tiny tokenizer
    (its ids are valid in every vocabulary here). Built on `device`: a 1B model inits in seconds on a GPU."""
    torch.manual_seed(0)
    model_class, sizes = REAL_SHAPES[shape]
    tokenizer = tiny_tokenizer()
    config_class = BertConfig if model_class is BertModel else LlamaConfig
    config = config_class(**sizes, pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        model = model_class(config)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_adapter(
    model_dir: Path, out: Path, task: str, seed: int, labels: tuple[str, ...] = ("neg", "pos"),
    kernel: int = 8, scale: float = 0.3,
) -> Path:
    """An adapter with large random DCFT tensors and head, so outputs visibly differ."""
    torch.manual_seed(seed)
    num_labels = {"seq_cls": len(labels), "regression": 1}.get(task)
    model = load_backbone(model_dir, task, num_labels)
    heads = default_head_modules(model, task)
    config = DCFTConfig(kernel_size=kernel, init="paper")
    inject_adapter(model, config, heads)
    with torch.no_grad():
        for layer in dcft_layers(model).values():
            for param in (layer.dcft_A, layer.dcft_B, layer.dcft_C):
                param.copy_(torch.randn_like(param) * scale)
        for head in heads:
            for param in model.get_submodule(head).parameters():
                param.copy_(torch.randn_like(param))
    name = backbone_ref(model_dir, model.config).name
    adapter = adapter_config_for(model, config, name, task, heads, list(labels) if task == "seq_cls" else [])
    return save_adapter(model, out, adapter)
