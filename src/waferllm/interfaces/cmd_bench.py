"""`waferllm bench`: registered when its layer lands."""
