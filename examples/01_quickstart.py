"""Compress a torchvision ResNet-50 by half and print params and MACs before and after."""

import torch
import torchvision

import shrink

model = torchvision.models.resnet50(weights=None).eval()
x = (torch.randn(1, 3, 224, 224),)
result = shrink.prune(model, x, shrink.PruneConfig(0.5))  # verify=True: masked oracle checked
print(result.report)
small = shrink.compress(model, 0.5)  # the one-call form: returns only the smaller model
print(f"one-call compress: {sum(p.numel() for p in small.parameters()):,} parameters")
