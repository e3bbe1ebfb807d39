"""NNGeometry's ``DummyGenerator``: a stand-in generator that knows only a device."""


class DummyGenerator:
    def __init__(self, device):
        self.device = device
