"""Task heads over :class:`~vpeft.backbones.Backbone` features. Each task module keeps the registry of its heads."""
