"""What every paper script shares and nothing about any paper: data in, pictures and arrays out, Ctrl-C between steps."""
from .data import UserError, data_dir, mnist, mnist_uint8, moving_mnist, prompts, write_fake_mnist, WORDS
from .steps import between_steps
from .write import log, save_gif, save_npz, save_png, to_uint8
