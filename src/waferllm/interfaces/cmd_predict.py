"""`waferllm predict`: registered when its layer lands."""
