"""Task heads that are more than a layer: segmentation decoders (and their registry) and the
projectors that turn encoder tokens into language-model inputs. Tasks import them; they are kept
out of `downstream/tasks/`, which holds only task modules (the registry imports every one)."""
