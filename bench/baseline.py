"""The comparison point: a VAE trained the way the canonical PyTorch example does it.

torchvision's dataset with `ToTensor` behind a DataLoader (batch 128, shuffled,
no workers on CPU), an eager loop, a sum-reduced BCE + KL loss and one
`.item()` host sync per step. Written here from the example's description (MLP
784-400-20, Adam 1e-3) so both sides of the benchmark train the same model.
"""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def torchvision_root(source: Path, root: Path) -> Path:
    """Lay out the IDX files as torchvision's FashionMNIST expects them (`<root>/FashionMNIST/raw/`),
    decompressed: the Debian files are recompressed, so torchvision's md5 check of the .gz would fail."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        target = raw / name
        if target.exists():
            continue
        plain, packed = source / name, source / f"{name}.gz"
        if plain.exists():
            shutil.copyfile(plain, target)
        else:
            with gzip.open(packed, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return root


class ExampleVAE(nn.Module):
    def __init__(self, hidden: int = 400, z_dim: int = 20):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc21 = nn.Linear(hidden, z_dim)
        self.fc22 = nn.Linear(hidden, z_dim)
        self.fc3 = nn.Linear(z_dim, hidden)
        self.fc4 = nn.Linear(hidden, 784)

    def forward(self, x):
        h = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def example_loss(recon, x, mu, logvar):
    bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


class Baseline:
    """One model, its optimizer and the two loaders, so epochs can be timed one by one."""

    def __init__(self, root: Path, device: torch.device, seed: int = 1, batch_size: int = 128,
                 n_train: int | None = None, n_test: int | None = None):
        torch.manual_seed(seed)
        self.device = device
        cuda = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
        to_tensor = transforms.ToTensor()
        train = datasets.FashionMNIST(root, train=True, download=False, transform=to_tensor)
        test = datasets.FashionMNIST(root, train=False, download=False, transform=to_tensor)
        if n_train is not None:  # the bench's quick mode: the first images only, as vaelab's side gets
            train, test = Subset(train, range(n_train)), Subset(test, range(n_test or len(test)))
        self.train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, **cuda)
        self.test_loader = DataLoader(test, batch_size=batch_size, shuffle=False, **cuda)
        self.model = ExampleVAE().to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def train_epoch(self) -> float:
        self.model.train()
        total = 0.0
        for x, _ in self.train_loader:
            x = x.to(self.device)
            self.optimizer.zero_grad()
            recon, mu, logvar = self.model(x)
            loss = example_loss(recon, x, mu, logvar)
            loss.backward()
            total += loss.item()
            self.optimizer.step()
        return total / len(self.train_loader.dataset)

    def test_loss(self) -> float:
        """Mean negative ELBO per test image, in nats."""
        self.model.eval()
        total = 0.0
        with torch.no_grad():
            for x, _ in self.test_loader:
                x = x.to(self.device)
                recon, mu, logvar = self.model(x)
                total += example_loss(recon, x, mu, logvar).item()
        return total / len(self.test_loader.dataset)

    def epoch(self) -> tuple[float, float]:
        """(seconds, test loss) of one epoch: a training pass, then the test pass, as the example does."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        self.train_epoch()
        test = self.test_loss()
        return time.perf_counter() - started, test
