"""crnn-art: a convolutional-recurrent classifier of paintings (style, genre, artist) on WikiArt."""

from crnn_art.model import CRNNArtClassifier, CRNNOutput, ModelLoadError
from crnn_art.predict import predict

__version__ = "0.1.0"
__all__ = ["CRNNArtClassifier", "CRNNOutput", "ModelLoadError", "predict", "__version__"]
