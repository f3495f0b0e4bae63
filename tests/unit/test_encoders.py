"""Metadata encoders: values, cyclicity, missing rows, and agreement with polli-typus."""

from __future__ import annotations

import math
from datetime import date, datetime

import numpy as np
import pytest
from typus.models.geo import datetime_to_temporal_sinusoids, elevation_to_sinusoids, latlon_to_unit_sphere

from linnaeus.data import encoders as enc
from linnaeus.errors import DataError


def test_spatial_unit_sphere_values_and_missing():
    lat = [0.0, 90.0, -45.0, 12.5, float("nan"), None, 0.0]
    lon = [0.0, 10.0, 170.0, -77.0, 3.0, 4.0, float("nan")]
    x = enc.encode_spatial(lat, lon)
    assert x.dtype == np.float32 and x.shape == (7, 3)
    np.testing.assert_allclose(x[0], [1.0, 0.0, 0.0], atol=1e-7)  # (0, 0) is a real place, not missing
    np.testing.assert_allclose(x[1], [0.0, 0.0, 1.0], atol=1e-7)
    for i in (2, 3):
        np.testing.assert_allclose(x[i], latlon_to_unit_sphere(lat[i], lon[i]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x[:4], axis=1), 1.0, atol=1e-6)
    assert (x[4:] == 0).all()
    np.testing.assert_array_equal(enc.valid_mask(x), [True, True, True, True, False, False, False])


def test_spatial_out_of_range_is_one_line_error():
    with pytest.raises(DataError, match=r"raw_lat\[1\].*lat=95.*expected lat in \[-90, 90\]") as err:
        enc.encode_spatial([10.0, 95.0], [0.0, 0.0], name="raw_lat")
    assert "\n" not in str(err.value)


def test_temporal_month_matches_typus_and_is_cyclic():
    dates = ["2024-01-15", "2023-06-01T10:00:00", date(2020, 12, 31), datetime(2021, 3, 2, 18, 30)]
    x = enc.encode_temporal(dates)
    assert x.dtype == np.float32 and x.shape == (4, 2)
    for row, month in zip(x, (1, 6, 12, 3), strict=True):
        np.testing.assert_allclose(row, datetime_to_temporal_sinusoids(datetime(2000, month, 1)), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
    # Cyclic: December is as close to January as February is.
    months = enc.encode_temporal(months=np.arange(1, 13))
    d_dec_jan = np.linalg.norm(months[11] - months[0])
    d_jan_feb = np.linalg.norm(months[0] - months[1])
    assert d_dec_jan == pytest.approx(d_jan_feb, abs=1e-6)
    assert enc.valid_mask(months).all()  # December (angle 2π) is not an all-zero row
    np.testing.assert_array_equal(enc.encode_temporal(months=[1, 6, 12, 3]), x)


def test_temporal_hour_and_missing():
    x = enc.encode_temporal(
        ["2024-06-01T18:00:00Z", "2024-06-01", "", None, float("nan"), b"2024-02-03"], with_hour=True
    )
    assert x.shape == (6, 4)
    np.testing.assert_allclose(x[0], [math.sin(math.pi), math.cos(math.pi), -1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(x[1, :2], x[0, :2])
    assert (x[1, 2:] == 0).all()  # a date without a time of day: hour unknown, month kept
    assert (x[2:5] == 0).all()
    np.testing.assert_allclose(x[5, :2], datetime_to_temporal_sinusoids(datetime(2000, 2, 1)), atol=1e-6)
    np.testing.assert_array_equal(enc.valid_mask(x), [True, True, False, False, False, True])


def test_temporal_bad_date_names_the_entry():
    with pytest.raises(DataError, match=r"raw_date_observed\[1\]: cannot parse 'June 1'.*ISO 8601"):
        enc.encode_temporal(["2024-01-01", "June 1"], name="raw_date_observed")
    with pytest.raises(DataError, match=r"month 13 out of range"):
        enc.encode_temporal(months=[13])


def test_elevation_sea_level_is_not_missing():
    e = enc.encode_elevation([0.0, 1234.5, float("nan"), None, -50.0])
    assert e.dtype == np.float32 and e.shape == (5, 10)
    assert len(enc.ELEVATION_SCALES) == 5
    np.testing.assert_array_equal(e[0, 0::2], 0.0)  # sines
    np.testing.assert_array_equal(e[0, 1::2], 1.0)  # cosines
    np.testing.assert_allclose(e[1], elevation_to_sinusoids(1234.5, enc.ELEVATION_SCALES), atol=1e-6)
    np.testing.assert_allclose(e[4], elevation_to_sinusoids(-50.0, enc.ELEVATION_SCALES), atol=1e-6)
    assert (e[2:4] == 0).all()
    np.testing.assert_array_equal(enc.valid_mask(e), [True, True, False, False, True])
    # Custom scales: 2 columns per scale, sin then cos.
    np.testing.assert_allclose(enc.encode_elevation([250.0], scales=(1000.0,)), [[1.0, 0.0]], atol=1e-6)


def test_valid_mask_treats_nan_and_zero_rows_as_missing():
    x = np.array([[0.0, 0.0], [np.nan, 1.0], [0.0, 1.0], [np.inf, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(enc.valid_mask(x), [False, False, True, False])


def test_column_names_match_dims():
    assert enc.COLUMN_NAMES["spatial"] == ("spatial_x", "spatial_y", "spatial_z")
    assert enc.COLUMN_NAMES["temporal"] == ("month_sin", "month_cos")
    assert enc.COLUMN_NAMES["temporal_hour"][2:] == ("hour_sin", "hour_cos")
    names = enc.COLUMN_NAMES["elevation_broadrange_2"]
    assert len(names) == 10 and names[:2] == ("elev_100_sin", "elev_100_cos")
    assert enc.scales_from_column_names(names) == enc.ELEVATION_SCALES


def test_encode_from_raw_selects_columns_in_requested_order():
    raw = {
        "raw_lat": [10.0],
        "raw_lon": [20.0],
        "raw_date_observed": ["2024-06-01T06:00:00"],
        "raw_elevation": [300.0],
    }
    sp = enc.encode_from_raw("spatial", raw, ["spatial_z", "spatial_x"])
    full = enc.encode_spatial([10.0], [20.0])
    np.testing.assert_array_equal(sp, full[:, [2, 0]])
    t = enc.encode_from_raw("temporal", raw, ["month_sin", "month_cos", "hour_sin", "hour_cos"])
    np.testing.assert_allclose(t[0, 2:], [1.0, 0.0], atol=1e-6)  # 06:00 is a quarter turn
    el = enc.encode_from_raw("elevation_custom", raw, ["elev_1200_sin", "elev_1200_cos"])
    np.testing.assert_allclose(el, [[1.0, 0.0]], atol=1e-6)
    with pytest.raises(DataError, match=r"spatial: cannot encode column\(s\) \['lat'\]"):
        enc.encode_from_raw("spatial", raw, ["lat"])
