"""Architecture name -> class, filled as each class is defined (SAE.__init_subclass__).

Its own module so that sae.core.io can look architectures up while the base class imports io
for SAE.save: neither imports the other through the back door.
"""
ARCHITECTURES: dict[str, type] = {}
