"""NNGeometry's ``DummyGenerator``: a stand-in generator that knows only a device."""


class DummyGenerator:
    """The generator of a representation restored from a pickle: it knows the device only.

    A pickled representation keeps its data (factors, blocks, diagonals) but not its generator,
    which holds the model and a function that is often a local closure (not picklable). Anything
    that needs the model again (``update_diag``) raises then, as in NNGeometry.
    """

    def __init__(self, device):
        self.device = device

    def get_device(self, layer_collection=None):
        return self.device
