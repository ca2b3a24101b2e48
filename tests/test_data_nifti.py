"""NIfTI into the Volume type: reorientation to axial (Z, Y, X) and round trips."""
import nibabel as nib
import numpy as np
import pytest

from ctflow.data import Volume, read_nifti, write_nifti


def ras_world(affine, ijk):
    return (affine @ np.append(ijk, 1.0))[:3]


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, -1), (1, -1, 1)])
def test_read_generated_volume(tmp_path, flip):
    rng = np.random.default_rng(1)
    data = rng.integers(-1024, 2000, (5, 4, 3)).astype(np.int16)  # (i, j, k)
    sx, sy, sz = 0.8, 0.9, 2.5
    aff = np.diag([sx * flip[0], sy * flip[1], sz * flip[2], 1.0])
    aff[:3, 3] = (-12.0, 30.0, 100.0)
    img = nib.Nifti1Image(data, aff)
    img.header.set_slope_inter(2.0, -10.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    vol = read_nifti(path)
    hu = data.astype(np.float64) * 2.0 - 10.0
    assert vol.shape == (3, 4, 5)
    np.testing.assert_allclose(vol.spacing, (sz, sy, sx))
    np.testing.assert_allclose(vol.orientation, [1, 0, 0, 0, 1, 0], atol=1e-12)
    assert np.all(np.diff(vol.positions[:, 2]) > 0)  # z (superior) increasing
    # Every voxel of the result sits where the NIfTI affine put the same value (LPS = RAS * diag(-1,-1,1)).
    for k, j, i in [(0, 0, 0), (2, 3, 4), (1, 2, 0), (2, 0, 3)]:
        lps = vol.positions[k] + i * vol.spacing[2] * vol.row_direction \
            + j * vol.spacing[1] * vol.column_direction
        ras = lps * np.array([-1, -1, 1])
        ijk = np.linalg.solve(aff[:3, :3], ras - aff[:3, 3])
        src = tuple(int(round(v)) for v in ijk)
        assert vol.hu[k, j, i] == pytest.approx(hu[src])


def test_nifti_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    vol = Volume(hu=rng.normal(0, 300, (4, 6, 5)).astype(np.float32), spacing=(3.0, 0.7, 0.6),
                 positions=[[-10.0, -20.0, 5.0 + 3.0 * k] for k in range(4)],
                 orientation=[1, 0, 0, 0, 1, 0])
    path = write_nifti(vol, tmp_path / "v.nii")
    back = read_nifti(path)
    np.testing.assert_array_equal(back.hu, vol.hu)
    np.testing.assert_allclose(back.positions, vol.positions, atol=1e-5)
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    with pytest.raises(FileExistsError):
        write_nifti(vol, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii"]  # no temporary left


def test_nifti_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_nifti(tmp_path / "missing.nii")
    (tmp_path / "bad.nii").write_bytes(b"not nifti" * 50)
    with pytest.raises(ValueError, match="bad.nii"):
        read_nifti(tmp_path / "bad.nii")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), tmp_path / "t.nii")
    with pytest.raises(ValueError, match="3-D"):
        read_nifti(tmp_path / "t.nii")
