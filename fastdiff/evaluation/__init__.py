"""Sample quality: the FID feature network, FID / KID / precision / recall, reference statistics."""
