"""Fixtures shared by several test files: the real MiniLM (test_bert.py, test_data.py), a tiny train.py run that
nothing stopped (test_train.py, test_runtime.py) and a tiny GLUE folder in every task's real format (test_data.py,
test_common.py)."""
import pytest

from helpers import minilm_dir, tiny_task, write


@pytest.fixture(scope="session")
def minilm():
    return minilm_dir()  # no skip: CI must fetch it (pip reaches PyPI there) or fail


@pytest.fixture(scope="session")
def never_stopped(tmp_path_factory):
    """The reference: a tiny run that nothing interrupts."""
    import train
    root = tmp_path_factory.mktemp("resume")
    args = tiny_task(root)
    results = train.main(args + ["--out", str(root / "ref")])
    return dict(root=root, args=args, results=results, ref=root / "ref")


# ----------------------------------------------------------------------------------------------
# GLUE readers' input, on tiny copies of every task's format

MNLI_HEAD = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2"


def mnli_row(i, s1, s2, labels=()):
    return "\t".join([str(i), "31193", f"{i}n", "government", "( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2,
                      *labels])


@pytest.fixture
def glue(tmp_path):
    """A GLUE folder with two or three examples per split of every task, in the real formats."""
    g = tmp_path / "glue"
    # CoLA: no header in train/dev, no final newline; a stray quote that must not start a quoted field.
    write(g / "CoLA/train.tsv", 'gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n'
                                'gj04\t0\t*\tThe more "books I ask to whom he will give.\n'
                                'bc01\t1\t\tHe said "hi".')
    write(g / "CoLA/dev.tsv", "gj04\t1\t\tThe weights made the rope stretch over the pulley.")
    write(g / "CoLA/test.tsv", "index\tsentence\n0\tBill whistled past the house.\n")
    write(g / "SST-2/train.tsv", "sentence\tlabel\nhide new secretions from the parental units \t0\n"
                                 "that loves its characters \t1\n")
    write(g / "SST-2/dev.tsv", "sentence\tlabel\nit 's a charming journey . \t1\n")
    write(g / "SST-2/test.tsv", "index\tsentence\n0\tuneasy mishmash of styles and genres .\n")
    mrpc_head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(g / "MRPC/train.tsv", mrpc_head + '1\t702876\t702977\tAmrozi accused his brother , whom he called " the '
                                'witness " .\tReferring to him as only " the witness " .\n'
                                "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .\n",
          bom=True)
    write(g / "MRPC/dev.tsv", mrpc_head + "1\t1355540\t1355592\tHe said the pie .\t\" The pie .\n", bom=True)
    write(g / "MRPC/test.tsv", "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1089874\t1089925\tPCCW 's chief .\tCurrent chief .\n")
    sts_head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    write(g / "STS-B/train.tsv", sts_head + "\tscore\n0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\t"
                                 "A plane is taking off.\tAn air plane is taking off.\t5.000\n"
                                 "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays.\tA man sings.\t0.750\n")
    write(g / "STS-B/dev.tsv", sts_head + "\tscore\n0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA.\tB.\t3.2\n")
    write(g / "STS-B/test.tsv", sts_head + "\n0\tmain-captions\tMSRvid\t2012test\t0024\tnone\tnone\tA girl.\tA boy.\n")
    qqp_head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    write(g / "QQP/train.tsv", qqp_head + "133273\t213221\t213222\tHow is the life of a math student?\t"
                               "Which level of math is needed?\t0\n"
                               "402555\t536040\t536041\tHow do I control my horny emotions?\n"  # broken
                               "360472\t364011\t490273\tWhat causes stool color to change?\tWhat can cause it?\t1\n")
    write(g / "QQP/dev.tsv", qqp_head + "201359\t303345\t303346\tWhy are African-Americans so beautiful?\t"
                             "Why are hispanics so beautiful?\t0\n")
    write(g / "QQP/test.tsv", "id\tquestion1\tquestion2\n0\tWould the idea work?\tIs the idea good?\n")
    write(g / "MNLI/train.tsv", f"{MNLI_HEAD}\tlabel1\tgold_label\n"
                                + mnli_row(0, "Conceptually cream skimming.", "Product and geography.",
                                           ["neutral", "neutral"]) + "\n"
                                + mnli_row(1, "you know during the season", "You lose the things.",
                                           ["entailment", "entailment"]) + "\n")
    dev_head = f"{MNLI_HEAD}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    five = lambda gold: ["neutral", gold, gold, gold, "neutral", gold]
    write(g / "MNLI/dev_matched.tsv", dev_head + mnli_row(0, "The new rights are nice.", "Everyone likes them.",
                                                          five("neutral")) + "\n")
    write(g / "MNLI/dev_mismatched.tsv", dev_head + mnli_row(0, "Your contribution helped.", "It did not help.",
                                                             five("contradiction")) + "\n"
                                         + mnli_row(1, "It was nice.", "It was good.", five("entailment")) + "\n")
    write(g / "MNLI/test_matched.tsv", MNLI_HEAD + "\n" + mnli_row(0, "Hierbas, ans seco.", "No hierbas.") + "\n")
    write(g / "MNLI/test_mismatched.tsv", MNLI_HEAD + "\n" + mnli_row(0, "What have you decided?", "Nothing.") + "\n")
    for folder, head in (("QNLI", "index\tquestion\tsentence"), ("RTE", "index\tsentence1\tsentence2"),
                         ("WNLI", "index\tsentence1\tsentence2")):
        labels = ("0", "1") if folder == "WNLI" else ("entailment", "not_entailment")
        write(g / folder / "train.tsv", f"{head}\tlabel\n0\tWhat came first?\tThe egg.\t{labels[1]}\n"
                                        f"1\tA dog barks.\tAn animal makes noise.\t{labels[0]}\n")
        write(g / folder / "dev.tsv", f"{head}\tlabel\n0\tIs it?\tIt is.\t{labels[0]}\n")
        write(g / folder / "test.tsv", f"{head}\n0\tWhy?\tBecause.\n")
    return g
