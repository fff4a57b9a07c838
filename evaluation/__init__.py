"""Evaluation networks and metrics that score generated images: the FID Inception, CLIP, the
ResNet-18 classifier and level net, the procedural Earth's conditioning probe; set distances;
editing against ground truth."""
