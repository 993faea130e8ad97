"""crnn-art: a convolutional-recurrent classifier of paintings (style, genre, artist) on WikiArt."""

from crnn_art.model import CRNNArtClassifier, CRNNOutput, ModelLoadError

__version__ = "0.1.0"
__all__ = ["CRNNArtClassifier", "CRNNOutput", "ModelLoadError", "__version__"]
