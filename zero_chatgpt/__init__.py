"""zero-chatgpt: the whole ChatGPT recipe from zero, in one package and one command."""

__version__ = "0.1.0"
