"""Text: token ids to text (one pipeline for every stream), stop strings, prompts, and the reading of a
reply as thinking, content and tool calls. Nothing here imports torch."""
