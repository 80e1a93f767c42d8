{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "palisade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified name prefix for the release's objects. Truncated to leave room for the "-agent"
and "-lease" suffixes within the 63-character limit of labels and DNS names.
*/}}
{{- define "palisade.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"name-version" for the helm.sh/chart label.
*/}}
{{- define "palisade.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The image tag: image.tag, else the chart's appVersion.
*/}}
{{- define "palisade.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString -}}
{{- end -}}

{{/*
The full image reference; a digest wins over the tag.
*/}}
{{- define "palisade.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (include "palisade.imageTag" .) -}}
{{- end -}}
{{- end -}}

{{/*
Selector labels (immutable once a DaemonSet exists: do not add to these).
*/}}
{{- define "palisade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "palisade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{/*
Standard labels for every object.
*/}}
{{- define "palisade.labels" -}}
helm.sh/chart: {{ include "palisade.chart" . }}
{{ include "palisade.selectorLabels" . }}
app.kubernetes.io/version: {{ regexReplaceAll "[^-A-Za-z0-9_.]" (include "palisade.imageTag" .) "_" | trunc 63 | trimAll "-_." | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: palisade
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The ServiceAccount the agent runs as.
*/}}
{{- define "palisade.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "palisade.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Fail early on value combinations the schema cannot express.
*/}}
{{- define "palisade.validate" -}}
{{- if not (or .Values.netpol.enabled .Values.loadbalancer.enabled) -}}
{{- fail "palisade: at least one of netpol.enabled and loadbalancer.enabled must be true (with both disabled the agent has nothing to do)" -}}
{{- end -}}
{{- end -}}

{{/*
The listen address, bracketing IPv6 hosts: "0.0.0.0:9476", "[::]:9476".
*/}}
{{- define "palisade.listenAddr" -}}
{{- $host := .Values.agent.listenHost | toString -}}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) -}}
{{- printf "[%s]:%d" $host (int .Values.agent.port) -}}
{{- else -}}
{{- printf "%s:%d" $host (int .Values.agent.port) -}}
{{- end -}}
{{- end -}}

{{/*
The membership key: whether L2 runs (and so needs one), whether the chart creates the Secret,
and the Secret's name.
*/}}
{{- define "palisade.memberlistKeyNeeded" -}}
{{- if and .Values.loadbalancer.enabled .Values.loadbalancer.l2.enabled (not .Values.loadbalancer.l2.memberlistInsecure) -}}
true
{{- end -}}
{{- end -}}

{{- define "palisade.memberlistSecretCreate" -}}
{{- if and (include "palisade.memberlistKeyNeeded" .) (not .Values.loadbalancer.l2.memberlistKey.existingSecret) -}}
true
{{- end -}}
{{- end -}}

{{- define "palisade.memberlistSecretName" -}}
{{- .Values.loadbalancer.l2.memberlistKey.existingSecret | default (printf "%s-memberlist" (include "palisade.fullname" .)) -}}
{{- end -}}
