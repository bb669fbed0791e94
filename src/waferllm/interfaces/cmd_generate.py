"""`waferllm generate`: registered when its layer lands."""
