"""What every tokenizer shares: the special ids of the tokenizers trained here and
`prompt_ids`. lm/tokenizer.py (byte, sentencepiece) and lm/interop/hf_tokenizer.py
(a Hugging Face checkpoint's tokenizer.json) both import it; it imports neither."""

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class PromptIds:
  """`prompt_ids`, from `adds_bos`, `bos_id` and `encode`."""
  # The file a Hugging Face checkpoint's chat template was read from, for its errors
  # (lm/chat.py); None for one read back from a checkpoint, or none at all.
  chat_template_source = None

  def prompt_ids(self, text: str) -> list[int]:
    """transformers' `tokenizer(text).input_ids`: bos where the tokenizer adds one."""
    return [self.bos_id] * self.adds_bos + [int(i) for i in self.encode(text)]
