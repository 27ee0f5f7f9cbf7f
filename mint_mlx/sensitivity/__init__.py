"""How much each weight moves the model's output: the column Fisher from a short forward/backward pass."""
