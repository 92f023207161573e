"""Text side shared by data preparation and the model: tokenizer loading and prompt formats."""
