import subprocess
import sys


def test_sparsity_imports_without_ray_s3fs_or_boto3():
    """Importing every sparsity module leaves ray, s3fs, boto3 and botocore out of sys.modules."""
    code = (
        "import sys, pkgutil, importlib, sparsity\n"
        "for m in pkgutil.walk_packages(sparsity.__path__, 'sparsity.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in ('ray', 's3fs', 'boto3', 'botocore') if n in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
