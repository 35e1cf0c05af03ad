"""bench_scaling's figure and tables."""

from __future__ import annotations

from pathlib import Path


# ---- report --------------------------------------------------------------------------------------
def plot(report: dict, png: Path) -> None:
    """One log-log panel per part, the slope in each legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("predict", "startup", "preprocess") if p in report["parts"]]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        r = report["parts"][part]
        ok = [row for row in r["rows"] if "error" not in row]
        if part == "predict":
            x = [row["voxels"] / 1e6 for row in ok]
            series = [("predict s", [row["predict_s"] for row in ok], r["slope_predict_s"]),
                      ("peak PSS GB", [row["peak_pss_gb"] for row in ok], r["slope_peak_pss_gb"])]
            ax.set_xlabel("input voxels (millions)")
        elif part == "startup":
            x, series = [], []
            for index in ("cold", "warm"):
                mode = [row for row in ok if row["index"] == index]
                if not mode:
                    continue
                x = [row["volumes"] for row in mode]
                series += [(f"s to first step, index {index}", [row["first_step_from_call_s"] for row in mode],
                            r[index]["slope_first_step_from_call_s"]),
                           (f"s to index, {index}", [row["index_s"] for row in mode], r[index]["slope_index_s"])]
            last = "warm" if "warm" in r else "cold"
            series.append((f"PSS GB after steps ({last})",
                           [row["memory_last"]["pss_gb"] for row in ok if row["index"] == last],
                           r[last]["slope_pss_after_steps_gb"]))
            ax.set_xlabel("preprocessed volumes")
        else:
            x = [row["np"] for row in ok]
            series = [("cases/min", [row["cases_per_min"] for row in ok], r["slope_cases_per_min"]),
                      ("peak PSS GB", [row["peak_pss_gb"] for row in ok], r["slope_peak_pss_gb"])]
            ax.set_xlabel("-np (worker processes)")
        for label, y, k in series:
            ax.plot(x, y, "o-", label=f"{label} (slope {k:.2f})" if k is not None else label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(part)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"diffprobe scaling ({report['machine']['cpu_count']} cores, load {report['load_before']})")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def print_tables(report: dict) -> None:
    parts = report["parts"]
    if "predict" in parts:
        r = parts["predict"]
        print("\n| volume (z×y×x) | voxels (M) | predict s | wall s | peak RSS GB | peak PSS GB | phases s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for row in r["rows"]:
            phases = row.get("phases_s", row.get("error", ""))
            print(f"| {'×'.join(map(str, row['shape_zyx']))} | {row['voxels'] / 1e6:.2f} | "
                  f"{row.get('predict_s', '-')} | {row['wall_s']} | {row['peak_rss_gb']} | {row['peak_pss_gb']} | "
                  f"{phases} |")
        print(f"slopes: predict s {r['slope_predict_s']} (two largest {r['slope_predict_s_two_largest']}), "
              f"wall s {r['slope_wall_s']}, peak PSS {r['slope_peak_pss_gb']} (two largest "
              f"{r['slope_peak_pss_gb_two_largest']})")
    if "startup" in parts:
        r = parts["startup"]
        print("\n| volumes | case index | index s | first step s (from call) | first step s (from start) | "
              "JSON / array opens before first step | PSS GB after 1 / N steps | RSS GB after N steps |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in r["rows"]:
            if "error" in row:
                print(f"| {row['volumes']} | {row['index']} | failed | | | | | |")
                continue
            o = row["opens_before_first_step"]
            print(f"| {row['volumes']} | {row['index']} | {row['index_s']} | {row['first_step_from_call_s']} | "
                  f"{row['first_step_from_start_s']} | {o['json_opens']} / {o['array_opens']} | "
                  f"{row['memory_first']['pss_gb']:.3f} / {row['memory_last']['pss_gb']:.3f} | "
                  f"{row['memory_last']['rss_gb']:.3f} |")
        for index in ("cold", "warm"):
            if index in r:
                k = r[index]
                print(f"slopes, index {index}: index {k['slope_index_s']}, first step "
                      f"{k['slope_first_step_from_call_s']}, PSS after steps {k['slope_pss_after_steps_gb']}")
    if "preprocess" in parts:
        r = parts["preprocess"]
        print("\n| -np | seconds | cases/min | peak PSS GB | peak RSS GB |")
        print("| --- | --- | --- | --- | --- |")
        for row in r["rows"]:
            print(f"| {row['np']} | {row['seconds']} | {row['cases_per_min']:.1f} | {row['peak_pss_gb']} | "
                  f"{row['peak_rss_gb']} |")
        print(f"slopes: cases/min {r['slope_cases_per_min']}, peak PSS {r['slope_peak_pss_gb']}")

