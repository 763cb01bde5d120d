"""An independent reference of mos make-groups --strategy taxonomy (default
anchors) for scripts/bench.sh groups: reads WordNet 3.0's data.noun by byte
offset (a synset's offset is its byte position in the file), follows each
class's first-listed hypernym (`@`, else `@i`) up to the first anchor, and
prints the groups as mos writes them: one line per group, `name count`.
Usage: groups_ref.py WORDNET_DIR CLASSES.txt GROUPS.json  (exit 1 if they differ)
"""
import json
import sys

ANCHORS = [("animal", 15388), ("artifact", 21939), ("geological_formation", 9287968),
           ("fungus", 12992868), ("rest", None), ("natural_object", 19128),
           ("person", 7846), ("flower", 11669921)]


def main(wn_dir, classes_file, groups_file):
    data = open(wn_dir + "/data.noun", "rb").read()
    group_of = {o: i for i, (_, o) in enumerate(ANCHORS) if o is not None}
    rest = [n for n, _ in ANCHORS].index("rest")

    def hypernym(o):
        p = data[o:data.index(b"\n", o)].split(b" | ")[0].split()
        assert int(p[0]) == o, o
        i = 4 + 2 * int(p[3], 16)
        ptrs = [p[i + 1 + 4 * k:i + 5 + 4 * k] for k in range(int(p[i]))]
        h = [int(q[1]) for q in ptrs if q[0] == b"@" and q[2] == b"n"] or \
            [int(q[1]) for q in ptrs if q[0] == b"@i" and q[2] == b"n"]
        return h[0] if h else None

    groups = [[] for _ in ANCHORS]
    for c in open(classes_file).read().split():
        o = int(c[1:])
        g = rest
        while o is not None:
            if o in group_of:
                g = group_of[o]
                break
            o = hypernym(o)
        groups[g].append(c)
    want = [(ANCHORS[i][0], m) for i, m in enumerate(groups) if m]
    got = json.load(open(groups_file))
    ok = [n for n, _ in want] == got["group_names"] and [m for _, m in want] == got["classes"]
    for n, m in want:
        print(n, len(m))
    if not ok:
        print("mos make-groups and the reference differ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:])
